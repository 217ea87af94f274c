// The map's background and tiles for app.js: a coordinate grid and a scale bar under the
// configured tiles (or instead of them), the tiles' credit as plain text, and a notice while
// tiles fail to load. Plain script, no build step; loaded before app.js.
"use strict";

window.TeamtrackTiles = (function () {
  function escapeHtml(text) {
    const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
    return String(text).replace(/[&<>"']/g, (character) => entities[character]);
  }

  function gridTile(coords) {
    const tile = document.createElement("canvas");
    const size = this.getTileSize();
    tile.width = size.x;
    tile.height = size.y;
    const context = tile.getContext("2d");
    context.strokeStyle = "#cdd5df";
    context.strokeRect(0.5, 0.5, size.x, size.y);
    const corner = this._map.unproject(coords.scaleBy(size), coords.z);
    const digits = Math.max(0, Math.min(5, Math.ceil((coords.z - 2) * 0.3)));
    context.fillStyle = "#7d8896";
    context.font = "10px system-ui, sans-serif";
    context.fillText(corner.lat.toFixed(digits) + "°, " + corner.wrap().lng.toFixed(digits) + "°", 4, 12);
    return tile;
  }

  // Tiles that do not load (no internet, a tile server down): a notice, and no credit for a
  // map that is not shown. Recovers when tiles load again.
  function watchTiles(map, config, notice, tiles) {
    let failed = 0;
    let loaded = 0;
    let down = false;
    const credit = escapeHtml(config.tile_attribution || "");
    tiles.on("tileerror", () => {
      failed += 1;
      if (!down && failed >= 2 && failed > loaded) {
        down = true;
        document.body.dataset.tiles = "down";
        if (credit) map.attributionControl.removeAttribution(credit);
        notice.hidden = false;
      }
    });
    tiles.on("tileload", () => {
      loaded += 1;
      if (!down) document.body.dataset.tiles = "up";
      if (down) {
        down = false;
        failed = 0;
        document.body.dataset.tiles = "up";
        if (credit) map.attributionControl.addAttribution(credit);
        notice.hidden = true;
      }
    });
  }

  function add(map, config, notice) {
    // Under the tiles, or instead of them (none configured, or unreachable): a faint grid that
    // pans and zooms with the map, so that movement still reads on a plain background.
    // Each grid tile carries the coordinates of its corner, so that a map without tiles still
    // tells where things are; the scale bar gives distances.
    new (L.GridLayer.extend({ createTile: gridTile }))({ zIndex: 0 }).addTo(map);
    L.control.scale({ imperial: false, position: "bottomleft" }).addTo(map);
    if (config.tile_url) {
      const tiles = L.tileLayer(config.tile_url, {
        maxZoom: 19,
        // Leaflet writes attributions as HTML: the configured text is escaped into plain text.
        attribution: escapeHtml(config.tile_attribution || ""),
        crossOrigin: false,
      });
      watchTiles(map, config, notice, tiles);
      tiles.addTo(map);
    }
  }

  return { add: add, escapeHtml: escapeHtml };
})();
