// The workers on the map, for app.js: one canvas circle marker and trail per worker, and
// clusters where the view is dense. Plain script, no build step; Leaflet is loaded before it.
// Data is only ever written as text (a text node, textContent): Leaflet takes a string given to
// bindTooltip or as a divIcon's html as HTML, so none is given one.
"use strict";

window.TeamtrackMarkers = (function () {
  // Clusters: below CLUSTER_BELOW_ZOOM (labels start there), with more than CLUSTER_MIN_IN_VIEW
  // workers in view, the workers whose markers fall in one CLUSTER_CELL_PX square of the screen
  // are drawn as one counted circle when there are at least CLUSTER_MIN_SIZE of them. A followed
  // worker is always drawn on its own. A smaller team is never clustered: every dot is shown.
  const CLUSTER_BELOW_ZOOM = 15;
  const CLUSTER_MIN_IN_VIEW = 200;
  const CLUSTER_CELL_PX = 64;
  const CLUSTER_MIN_SIZE = 4;
  // Moving workers change the clusters at most this often; a zoom or a pan at once.
  const CLUSTER_EVERY_MS = 500;
  // The cluster's colour and shape: its most urgent state (the list's order of need).
  const URGENCY = ["offline", "stale", "off_duty", "unknown", "online"];

  function create(host) {
    // host: { workers, map(), followed(), follow(id), colours, viewNow(), formatAge(ms),
    //         isAlerting(id), stateWords() }
    let trailRenderer = null;
    let markerRenderer = null;
    const clusters = new Map(); // cell key -> { marker, members: entries, look: string }
    let clusterTimer = null;
    let clusteredCount = 0;

    function attach(map) {
      // Two canvases: trails under markers, whatever order workers appear in.
      map.createPane("trails").style.zIndex = 390;
      map.createPane("workers").style.zIndex = 410;
      trailRenderer = L.canvas({ pane: "trails", padding: 0.2 });
      markerRenderer = L.canvas({ pane: "workers", padding: 0.2, tolerance: 4 });
      map.on("zoomend moveend", recluster);
    }

    function style(entry) {
      const selected = entry.id === host.followed();
      const colour = host.colours[entry.state];
      return {
        radius: selected ? 9 : 6,
        color: selected ? "#111" : "#fff",
        weight: selected ? 2.5 : 1.5,
        fillColor: colour,
        // Shape cues besides colour: offline hollow, off duty half filled, stale dashed outline.
        fillOpacity: entry.state === "offline" ? 0.15 : entry.state === "off_duty" ? 0.45 : 0.95,
        dashArray: entry.state === "stale" ? "3 2" : null,
        ...(selected || (entry.state !== "offline" && entry.state !== "off_duty") ? {}
          : { color: colour, weight: 2.5 }),
      };
    }

    function tooltipText(entry) {
      const age = entry.position ? ", " + host.formatAge(host.viewNow() - entry.rxMs) : "";
      return entry.id + " · " + entry.state + age;
    }

    function draw(entry, styleChanged) {
      const map = host.map();
      if (!map || !entry.position) return;
      const latLng = [entry.position.lat, entry.position.lon];
      if (!entry.marker) {
        entry.trailLine = L.polyline(entry.trail.slice(), {
          renderer: trailRenderer,
          pane: "trails",
          interactive: false,
          color: host.colours[entry.state],
          weight: 2,
          opacity: 0.45,
        });
        entry.marker = L.circleMarker(latLng, Object.assign({ renderer: markerRenderer,
          pane: "workers" }, style(entry)));
        // A text node, not a string: Leaflet inserts a string tooltip as HTML.
        entry.marker.bindTooltip(() => document.createTextNode(tooltipText(entry)),
          { direction: "top", offset: [0, -6] });
        entry.marker.on("click", () => host.follow(entry.id));
        entry.cluster = null; // the next pass may put it in a cluster
        show(entry, map);
        scheduleRecluster();
        return;
      }
      entry.marker.setLatLng(latLng);
      if (entry.label) entry.label.setLatLng(latLng);
      entry.trailLine.setLatLngs(entry.trail);
      if (styleChanged) {
        entry.marker.setStyle(style(entry));
        entry.trailLine.setStyle({ color: host.colours[entry.state] });
      }
      if (entry.cluster || clusters.size) scheduleRecluster();
    }

    function restyle(entry) {
      if (entry.marker) entry.marker.setStyle(style(entry));
    }

    function show(entry, map) {
      entry.trailLine.addTo(map);
      entry.marker.addTo(map);
    }

    function hide(entry) {
      entry.trailLine.remove();
      entry.marker.remove();
    }

    function remove(entry) {
      if (entry.marker) entry.marker.remove();
      if (entry.trailLine) entry.trailLine.remove();
      if (entry.label) entry.label.remove();
      entry.cluster = null;
    }

    function clear() {
      for (const cluster of clusters.values()) cluster.marker.remove();
      clusters.clear();
      clusteredCount = 0;
    }

    function points() {
      const found = [];
      for (const entry of host.workers.values()) {
        if (entry.position) found.push([entry.position.lat, entry.position.lon]);
      }
      return found;
    }

    // --- Clusters -------------------------------------------------------------------------
    function scheduleRecluster() {
      if (clusterTimer !== null) return;
      clusterTimer = window.setTimeout(() => {
        clusterTimer = null;
        recluster();
      }, CLUSTER_EVERY_MS);
    }

    function cellsOf(map) {
      const zoom = map.getZoom();
      if (zoom >= CLUSTER_BELOW_ZOOM) return null;
      const view = map.getBounds().pad(0.2);
      const followed = host.followed();
      const cells = new Map();
      let inView = 0;
      for (const entry of host.workers.values()) {
        if (!entry.marker || !entry.position) continue;
        const latLng = entry.marker.getLatLng();
        if (!view.contains(latLng)) continue;
        inView += 1;
        if (entry.id === followed) continue;
        const point = map.project(latLng, zoom);
        const key = Math.floor(point.x / CLUSTER_CELL_PX) + ":" +
          Math.floor(point.y / CLUSTER_CELL_PX);
        const members = cells.get(key);
        if (members) members.push(entry);
        else cells.set(key, [entry]);
      }
      return inView > CLUSTER_MIN_IN_VIEW ? cells : null;
    }

    function recluster() {
      const map = host.map();
      if (!map) return;
      const cells = cellsOf(map) || new Map();
      const wanted = new Map(); // cell key -> members
      const placed = new Set(); // every worker in a cluster after this pass
      for (const [key, members] of cells) {
        if (members.length < CLUSTER_MIN_SIZE) continue;
        wanted.set(key, members);
        for (const entry of members) placed.add(entry);
      }
      // Workers in no cluster now come back on the map; clusters no longer wanted go...
      for (const [key, cluster] of clusters) {
        for (const entry of cluster.members) {
          if (entry.cluster === cluster && !placed.has(entry)) {
            entry.cluster = null;
            if (entry.marker) show(entry, map);
          }
        }
        if (!wanted.has(key)) {
          cluster.marker.remove();
          clusters.delete(key);
        }
      }
      // ...and the others are drawn as their cluster's counted circle, off the map themselves.
      clusteredCount = 0;
      for (const [key, members] of wanted) {
        let cluster = clusters.get(key);
        if (!cluster) {
          cluster = { marker: null, members: [], look: "" };
          clusters.set(key, cluster);
        }
        for (const entry of members) {
          if (!entry.cluster) hide(entry);
          entry.cluster = cluster;
        }
        cluster.members = members;
        clusteredCount += members.length;
        drawCluster(map, cluster);
      }
    }

    function summary(members) {
      let worst = URGENCY.length - 1;
      let needing = 0;
      let lat = 0;
      let lon = 0;
      for (const entry of members) {
        const rank = URGENCY.indexOf(entry.state);
        if (rank >= 0 && rank < worst) worst = rank;
        if (entry.state === "offline" || entry.state === "stale" || host.isAlerting(entry.id)) {
          needing += 1;
        }
        const latLng = entry.marker.getLatLng();
        lat += latLng.lat;
        lon += latLng.lng;
      }
      return { worst: URGENCY[worst], needing: needing,
        centre: [lat / members.length, lon / members.length] };
    }

    function drawCluster(map, cluster) {
      const { worst, needing, centre } = summary(cluster.members);
      const look = cluster.members.length + "/" + worst + "/" + needing;
      if (!cluster.marker) {
        cluster.marker = L.marker(centre, { keyboard: true, riseOnHover: true,
          icon: L.divIcon({ className: "cluster-icon" }) }); // drawn below, never Leaflet's pin
        cluster.marker.on("click", () => zoomInto(map, cluster));
        // Focusable (Tab), and Enter or Space zooms in as a click does.
        cluster.marker.on("keydown", (event) => {
          const key = event.originalEvent.key;
          if (key === "Enter" || key === " ") {
            event.originalEvent.preventDefault();
            zoomInto(map, cluster);
          }
        });
        cluster.marker.addTo(map);
      } else {
        cluster.marker.setLatLng(centre);
      }
      if (look !== cluster.look) {
        cluster.look = look;
        const words = cluster.members.length + " workers here" +
          (needing > 0 ? ", " + needing + " need attention" : "") + "; zoom in to see them";
        cluster.marker.setIcon(clusterIcon(cluster.members.length, worst, needing));
        // The focusable element is Leaflet's icon itself: it carries the words.
        const icon = cluster.marker.getElement();
        icon.setAttribute("role", "button");
        icon.setAttribute("aria-label", words);
        icon.title = words;
      }
    }

    // The circle's DOM, built as text: a count, the state that needs attention most (colour
    // and outline, as the workers' markers), and how many need attention.
    function clusterIcon(count, worst, needing) {
      const node = document.createElement("div");
      node.className = "cluster cluster-" + worst;
      node.style.setProperty("--cluster-colour", host.colours[worst]);
      const number = document.createElement("span");
      number.className = "cluster-count";
      number.textContent = String(count);
      node.append(number);
      if (needing > 0) {
        const badge = document.createElement("span");
        badge.className = "cluster-need";
        badge.textContent = "▲" + needing;
        node.append(badge);
      }
      node.setAttribute("aria-hidden", "true"); // the icon around it is labelled
      const size = count < 10 ? 30 : count < 100 ? 36 : 44;
      return L.divIcon({ html: node, className: "cluster-icon", iconSize: [size, size] });
    }

    function zoomInto(map, cluster) {
      const bounds = L.latLngBounds(cluster.members.map((entry) => entry.marker.getLatLng()));
      const target = Math.max(map.getBoundsZoom(bounds.pad(0.3)), map.getZoom() + 2);
      map.setView(bounds.getCenter(), Math.min(target, map.getMaxZoom()));
    }

    return {
      attach: attach,
      draw: draw,
      restyle: restyle,
      remove: remove,
      clear: clear,
      points: points,
      recluster: recluster,
      clusterCount: () => clusters.size,
      clusteredCount: () => clusteredCount,
    };
  }

  return { create: create };
})();
