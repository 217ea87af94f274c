// Zones and alerts on the manager's page: zones drawn on the map, an alerts panel (newest
// first, unacknowledged highlighted, Ack, who acknowledged), a toast per new alert, and a form
// to add a circle zone (click the map) or post any zone as GeoJSON.
// Every string that came from a person or a device (zone names, worker ids, details) is put
// in the page with textContent, never as HTML: Leaflet tooltips get DOM nodes.
(function () {
  "use strict";

  const MAX_ALERTS = 500;
  const TOAST_MS = 6000;
  const alerts = new Map(); // id -> alert
  let zonesLayer = null;
  let zones = [];
  let drawnZones = null;
  let team = null;
  let elements = null;
  let placing = false; // "circle" or "polygon" while the next clicks on the map draw a zone
  let vertices = [];
  let sketch = null;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function api(path, options) {
    const init = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    return fetch(`/api/teams/${encodeURIComponent(team)}/${path}`, init).then((response) => {
      if (!response.ok) {
        return response.json().catch(() => ({})).then((body) => {
          throw new Error(typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`);
        });
      }
      return response.status === 204 ? null : response.json();
    });
  }

  // The panel ------------------------------------------------------------------------------
  function buildPanel() {
    const panel = el("aside", "alerts-panel");
    panel.id = "alerts-panel";
    panel.setAttribute("aria-label", "Alerts");
    const head = el("h2", null, "Alerts ");
    const count = el("b", "alerts-count", "0");
    count.id = "alerts-count";
    head.appendChild(count);
    // Folded, the panel is its heading and count only, and leaves the map to the workers;
    // remembered for this browser tab.
    const fold = el("button", "alerts-fold");
    fold.type = "button";
    fold.setAttribute("aria-controls", "alerts-body");
    const body = el("div", "alerts-body");
    body.id = "alerts-body";
    function setFolded(folded) {
      panel.classList.toggle("folded", folded);
      body.hidden = folded;
      fold.textContent = folded ? "Show" : "Hide";
      fold.setAttribute("aria-expanded", String(!folded));
      fold.setAttribute("aria-label", folded ? "Show the alerts panel" : "Fold the alerts panel");
      try {
        window.sessionStorage.setItem("teamtrack.alertsFolded", folded ? "1" : "0");
      } catch (error) {
        // storage refused (private mode): folding still works for this page
      }
    }
    fold.addEventListener("click", () => setFolded(!body.hidden));
    head.appendChild(fold);
    const list = el("ol", "alerts-list");
    list.id = "alerts-list";
    const form = el("form", "zone-form");
    form.id = "zone-form";
    const name = el("input");
    name.name = "name";
    name.placeholder = "Zone name";
    name.maxLength = 80;
    name.required = true;
    name.setAttribute("aria-label", "Zone name");
    const radius = el("input");
    radius.name = "radius";
    radius.type = "number";
    radius.min = "5";
    radius.max = "100000";
    radius.value = "150";
    radius.setAttribute("aria-label", "Radius in metres");
    const shape = el("select");
    shape.name = "shape";
    shape.setAttribute("aria-label", "Shape");
    for (const [value, label] of [["circle", "circle"], ["polygon", "polygon"]]) {
      const option = el("option", null, label);
      option.value = value;
      shape.appendChild(option);
    }
    const place = el("button", null, "Add zone");
    place.type = "submit";
    const finish = el("button", "zone-finish", "Finish polygon");
    finish.type = "button";
    finish.hidden = true;
    const message = el("p", "zone-message");
    message.id = "zone-message";
    message.setAttribute("role", "status");
    form.append(name, shape, radius, place, finish, message);
    shape.addEventListener("change", () => { radius.hidden = shape.value !== "circle"; });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      placing = shape.value;
      vertices = [];
      finish.hidden = placing !== "polygon";
      // Corners clicked in quick succession must not zoom the map (a double click).
      if (placing === "polygon") window.teamtrack.map.doubleClickZoom.disable();
      message.textContent = placing === "circle"
        ? "Click the map where the zone's centre is."
        : "Click the map at each corner, then Finish polygon.";
    });
    finish.addEventListener("click", () => finishPolygon(window.teamtrack.map));
    const toasts = el("div", "alert-toasts");
    toasts.id = "alert-toasts";
    toasts.setAttribute("aria-live", "polite");
    body.append(list, form);
    panel.append(head, body);
    let folded = false;
    try {
      folded = window.sessionStorage.getItem("teamtrack.alertsFolded") === "1";
    } catch (error) {
      folded = false;
    }
    setFolded(folded);
    const main = document.querySelector("main") || document.body;
    main.appendChild(panel);
    document.body.appendChild(toasts);
    elements = { panel, list, count, name, radius, message, toasts, finish };
  }

  function sortedAlerts() {
    return Array.from(alerts.values()).sort(
      (a, b) => b.raised_ms - a.raised_ms || b.at - a.at || (a.id < b.id ? -1 : 1));
  }

  function render() {
    const items = sortedAlerts().map((alert) => {
      const item = el("li", alert.acked_by ? "alert acked" : "alert unacked");
      item.dataset.id = alert.id;
      item.dataset.kind = alert.kind;
      // 24 h, as the workers' list writes its times (not the locale's "12:44:35 PM").
      const when = el("time", "alert-time",
        new Date(alert.at).toLocaleTimeString([], { hour12: false }));
      const worker = el("b", "alert-worker", alert.worker);
      const detail = el("span", "alert-detail", alert.detail);
      item.append(when, worker, detail);
      if (alert.acked_by) {
        item.appendChild(el("span", "alert-acked", `acked by ${alert.acked_by}`));
      } else {
        const button = el("button", "alert-ack", "Ack");
        button.type = "button";
        button.addEventListener("click", () => acknowledge(alert.id, button));
        item.appendChild(button);
      }
      return item;
    });
    elements.list.replaceChildren(...items);
    let open = 0;
    for (const alert of alerts.values()) if (!alert.acked_by) open += 1;
    elements.count.textContent = String(open);
    elements.count.title = "unacknowledged alerts";
    window.dispatchEvent(new CustomEvent("teamtrack:alerts-changed"));
  }

  function toast(alert) {
    const node = el("div", "alert-toast");
    node.append(el("b", null, alert.worker), el("span", null, ` ${alert.detail}`));
    elements.toasts.appendChild(node);
    window.setTimeout(() => node.remove(), TOAST_MS);
    while (elements.toasts.children.length > 5) elements.toasts.firstChild.remove();
  }

  function unacknowledged() {
    const workers = new Set();
    for (const alert of alerts.values()) if (!alert.acked_by) workers.add(alert.worker);
    return workers;
  }

  function remember(alert) {
    alerts.set(alert.id, alert);
    if (alerts.size > MAX_ALERTS) {
      const oldest = sortedAlerts().slice(MAX_ALERTS);
      for (const old of oldest) alerts.delete(old.id);
    }
  }

  function acknowledge(id, button) {
    button.disabled = true;
    api(`alerts/${encodeURIComponent(id)}/ack`, { method: "POST" })
      .then((alert) => { remember(alert); render(); })
      .catch((error) => { button.disabled = false; elements.message.textContent = error.message; });
  }

  function loadAlerts() {
    return api("alerts?limit=200").then((body) => {
      for (const alert of body.alerts) remember(alert);
      render();
    }).catch(() => {});
  }

  // Zones ------------------------------------------------------------------------------------
  function drawZones(map) {
    // Two reads answered back to back (the page's own POST, the `zones` frame) draw once.
    const key = JSON.stringify(zones);
    if (key === drawnZones) return;
    drawnZones = key;
    if (!zonesLayer) zonesLayer = L.layerGroup().addTo(map);
    zonesLayer.clearLayers();
    const labels = new Map(); // label position -> {where, names}: zones sharing a centre stack
    for (const feature of zones) {
      const properties = feature.properties;
      const geometry = feature.geometry;
      let layer;
      if (geometry.type === "Point") {
        const [lon, lat] = geometry.coordinates;
        layer = L.circle([lat, lon], { radius: properties.radius_m, className: "zone" });
      } else {
        layer = L.polygon(geometry.coordinates[0].map(([lon, lat]) => [lat, lon]),
          { className: "zone" });
      }
      layer.addTo(zonesLayer);
      const where = geometry.type === "Point" ? layer.getLatLng() : layer.getBounds().getCenter();
      const key = `${where.lat.toFixed(5)},${where.lng.toFixed(5)}`; // about a metre
      if (!labels.has(key)) labels.set(key, { where, names: [] });
      labels.get(key).names.push(properties.name);
    }
    // The names as markers of their own (DOM nodes, never HTML), not permanent tooltips: one
    // of those could outlive its layer when zones were redrawn quickly. Names that share a
    // position are one column, not drawn over each other.
    for (const { where, names } of labels.values()) {
      const column = el("span", "zone-labels");
      for (const name of names) column.append(el("span", "zone-label", name));
      L.marker(where, {
        icon: L.divIcon({ html: column, className: "zone-tooltip", iconSize: null }),
        interactive: false, keyboard: false,
      }).addTo(zonesLayer);
    }
  }

  function loadZones(map) {
    return api("zones").then((body) => { zones = body.features; drawZones(map); }).catch(() => {});
  }

  function placeZone(map, event) {
    if (placing === "polygon") {
      vertices.push([event.latlng.lng, event.latlng.lat]);
      const points = vertices.map(([lon, lat]) => [lat, lon]);
      if (sketch) sketch.setLatLngs(points);
      else sketch = L.polyline(points, { className: "zone-sketch" }).addTo(map);
      return;
    }
    if (placing !== "circle") return;
    placing = false;
    postZone(map, {
      type: "Feature",
      geometry: { type: "Point", coordinates: [event.latlng.lng, event.latlng.lat] },
      properties: { name: elements.name.value, radius_m: Number(elements.radius.value) },
    });
  }

  function finishPolygon(map) {
    const ring = vertices.concat(vertices.length ? [vertices[0]] : []);
    placing = false;
    vertices = [];
    elements.finish.hidden = true;
    if (sketch) { sketch.remove(); sketch = null; }
    map.doubleClickZoom.enable();
    postZone(map, {
      type: "Feature",
      geometry: { type: "Polygon", coordinates: [ring] },
      properties: { name: elements.name.value },
    });
  }

  function postZone(map, feature) {
    api("zones", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(feature) })
      .then(() => { elements.message.textContent = "Zone added."; return loadZones(map); })
      .catch((error) => { elements.message.textContent = error.message; });
  }

  // Frames -----------------------------------------------------------------------------------
  function onFrame(event) {
    const frame = event.detail;
    if (!frame || !elements) return;
    if (frame.type === "alert" && frame.alert && typeof frame.alert.id === "string") {
      const known = alerts.has(frame.alert.id);
      // An alert announced twice (a rules service restart) is the same id: shown once.
      if (!known) {
        remember(frame.alert);
        toast(frame.alert);
        render();
      }
    } else if (frame.type === "alert_ack") {
      const alert = alerts.get(frame.id);
      if (alert && !alert.acked_by) {
        alert.acked_by = frame.by;
        alert.acked_ms = frame.at;
        render();
      } else if (!alert) {
        loadAlerts();
      }
    } else if (frame.type === "zones") {
      loadZones(window.teamtrack.map);
    } else if (["snapshot", "resume", "sync", "gap"].includes(frame.type)) {
      // Frames this page may have missed: a new connection, a viewer that fell behind, or a
      // resume between two frames of one notice batch (they share its cursor).
      loadAlerts();
    }
  }

  window.teamtrackAlerts = {
    unacknowledged: unacknowledged,
    alerts: () => sortedAlerts().map((alert) => Object.assign({}, alert)),
    zones: () => zones.map((feature) => feature.properties),
    toasts: () => (elements ? elements.toasts.children.length : 0),
  };

  function start() {
    const page = window.teamtrack;
    if (!page || !page.map || !page.team) {
      window.setTimeout(start, 100);
      return;
    }
    team = page.team;
    buildPanel();
    const map = page.map;
    map.on("click", (event) => placeZone(map, event));
    window.addEventListener("teamtrack:frame", onFrame);
    loadZones(map);
    loadAlerts();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
