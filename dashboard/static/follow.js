// The followed worker's panel (its last fixes, accuracy circle, speed, heading, battery,
// source and track export links) and the workers' labels on the map, for app.js.
// Plain script, no build step; loaded before app.js. Text only through textContent and text
// nodes: Leaflet takes a string tooltip as HTML.
"use strict";

window.TeamtrackFollow = (function () {
  // Names beside markers from this zoom on, while at most LABEL_MAX workers are in view.
  const LABEL_ZOOM = 15;
  const LABEL_MAX = 150;

  function create(host) {
    // Where a fix came from: the HTTP gateway's ids begin with "g", the bridges' with "b"; through
    // a bridge, an OwnTracks phone's fix has seq = its timestamp in seconds (docs/contract.md),
    // a native device counts its seq from 0.
    function sourceOf(entry) {
      const position = entry.position;
      if (!position) return "–";
      if (entry.origin && entry.origin[0] === "g") return "HTTP gateway";
      if (typeof position.seq === "number" && position.seq * 1000 === position.ts) return "OwnTracks";
      return "native (MQTT)";
    }

    function compass(degrees) {
      const points = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"];
      return Math.round(degrees) + "° " + points[Math.round(degrees / 45) % 8];
    }

    function panelRow(list, term, value) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      list.append(dt, dd);
    }

    let accuracyCircle = null;

    function fillPanel() {
      const map = host.map();
      const followed = host.followed();
      const panel = host.panel;
      const entry = followed === null ? null : host.workers.get(followed);
      if (accuracyCircle) {
        accuracyCircle.remove();
        accuracyCircle = null;
      }
      if (!entry) {
        panel.hidden = true;
        panel.replaceChildren();
        return;
      }
      panel.hidden = false;
      const now = host.viewNow();
      const position = entry.position;
      const facts = document.createElement("dl");
      panelRow(facts, "State", host.stateWords()[entry.state]);
      if (position) {
        panelRow(facts, "Last fix", host.seenText(entry.rxMs, now));
        panelRow(facts, "Position", position.lat.toFixed(5) + ", " + position.lon.toFixed(5));
        panelRow(facts, "Accuracy", typeof position.acc === "number"
          ? "± " + Math.round(position.acc) + " m" : "–");
        panelRow(facts, "Speed", typeof position.speed === "number"
          ? (position.speed * 3.6).toFixed(1) + " km/h" : "–");
        panelRow(facts, "Heading", typeof position.heading === "number" ? compass(position.heading) : "–");
        panelRow(facts, "Battery", typeof position.battery === "number"
          ? Math.round(position.battery) + "%" : "–");
        panelRow(facts, "Source", sourceOf(entry));
      }
      const fixes = document.createElement("ol");
      fixes.className = "fixes";
      fixes.setAttribute("aria-label", "Last fixes, newest first");
      for (const fix of entry.fixes.slice().reverse()) {
        const item = document.createElement("li");
        item.textContent = host.clockTime(fix.position.ts) + " · " + fix.position.lat.toFixed(5) + ", " +
          fix.position.lon.toFixed(5) + (typeof fix.position.speed === "number"
            ? " · " + (fix.position.speed * 3.6).toFixed(1) + " km/h" : "");
        fixes.appendChild(item);
      }
      const exports = document.createElement("p");
      exports.className = "exports";
      if (host.config().history) {
        exports.append("Track of the last 24 h: ");
        const since = Math.floor(host.serverNow() - 86400000);
        for (const format of ["gpx", "geojson", "csv"]) {
          const link = document.createElement("a");
          link.href = `/api/teams/${encodeURIComponent(host.team())}/workers/` +
            `${encodeURIComponent(entry.id)}` +
            `/track?since=${since}&format=${format}`;
          link.textContent = format.toUpperCase();
          link.setAttribute("download", "");
          exports.append(link, " ");
        }
      }
      panel.replaceChildren(facts, fixes, exports);
      if (map && position && typeof position.acc === "number" && position.acc > 0) {
        accuracyCircle = L.circle([position.lat, position.lon], {
          radius: position.acc, pane: "trails", interactive: false, color: host.colours[entry.state],
          weight: 1, fillOpacity: 0.08,
        }).addTo(map);
      }
    }

    // Permanent tooltips with the worker's id as a text node (never a string: HTML).
    function updateLabels() {
      const map = host.map();
      if (!map) return;
      const bounds = map.getBounds();
      const inView = [];
      if (map.getZoom() >= LABEL_ZOOM) {
        for (const entry of host.workers.values()) {
          if (entry.position && bounds.contains([entry.position.lat, entry.position.lon])) {
            inView.push(entry);
            if (inView.length > LABEL_MAX) break;
          }
        }
      }
      const show = new Set(inView.length <= LABEL_MAX ? inView : []);
      for (const entry of host.workers.values()) {
        if (show.has(entry)) {
          if (!entry.label) {
            entry.label = L.tooltip({ permanent: true, direction: "right", offset: [8, 0],
              className: "worker-label", interactive: false });
            entry.label.setContent(document.createTextNode(entry.id));
            entry.label.setLatLng([entry.position.lat, entry.position.lon]).addTo(map);
          }
        } else if (entry.label) {
          entry.label.remove();
          entry.label = null;
        }
      }
    }

    return { fillPanel: fillPanel, updateLabels: updateLabels };
  }

  return { create: create };
})();
