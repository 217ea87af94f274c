// The side list of app.js: rows sorted by need, counts that filter it, the alerting mark.
// Plain script, no build step; loaded before app.js. Text only through textContent.
"use strict";

window.TeamtrackList = (function () {
  // The list sorts by need: who may want help comes first (alerting: branch alerts' module).
  const NEED_RANK = { offline: 0, stale: 1, alerting: 2, off_duty: 3, unknown: 4, online: 5 };
  const STATES = ["offline", "stale", "off_duty", "online"];

  function create(host) {
    let filter = null; // a state the list is restricted to (a count clicked), or null
    let alerting = new Set(); // workers with unacknowledged alerts (window.teamtrackAlerts)
    let orderDirty = true;

    // Each row: state icon (shape and colour), name, an alert mark, last seen as a clock time and
    // an age, speed and battery. All text goes in with textContent.
    const ICONS = { online: "●", stale: "◔", offline: "✕", off_duty: "‖", unknown: "○" };
    const STATE_WORDS = { online: "online", stale: "stale", offline: "offline", off_duty: "off duty",
      unknown: "no fix yet" };

    function span(className) {
      const element = document.createElement("span");
      element.className = className;
      return element;
    }

    function newRow(entry) {
      const row = document.createElement("li");
      row.dataset.worker = entry.id;
      const button = document.createElement("button");
      button.type = "button";
      const icon = span("icon");
      icon.setAttribute("aria-hidden", "true");
      const name = span("name");
      name.textContent = entry.id;
      const mark = span("alert-mark");
      mark.textContent = "▲ alert";
      mark.hidden = true;
      const gaps = span("gaps");
      gaps.hidden = true;
      const seen = span("seen");
      const detail = span("detail");
      const top = span("line");
      top.append(icon, name, mark, gaps);
      const bottom = span("line sub");
      bottom.append(seen, detail);
      button.append(top, bottom);
      button.addEventListener("click", () => host.follow(entry.id));
      row.appendChild(button);
      entry.cells = { button: button, icon: icon, mark: mark, gaps: gaps, seen: seen, detail: detail };
      entry.row = row;
      row.hidden = !rowVisible(entry);
      return row;
    }

    function needRank(entry) {
      if (entry.state === "offline" || entry.state === "stale") return NEED_RANK[entry.state];
      if (alerting.has(entry.id)) return NEED_RANK.alerting;
      return NEED_RANK[entry.state];
    }

    // Need first; among the offline and stale, the longest unheard first; then by name.
    function compareNeed(a, b) {
      const rank = needRank(a) - needRank(b);
      if (rank !== 0) return rank;
      if (a.state === "offline" || a.state === "stale") {
        const seenA = Math.max(a.rxMs || 0, a.statusMs || 0);
        const seenB = Math.max(b.rxMs || 0, b.statusMs || 0);
        if (seenA !== seenB) return seenA - seenB;
      }
      return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    }

    function listOrder() {
      return host.sortedIds.map((id) => host.workers.get(id)).sort(compareNeed);
    }

    function buildList() {
      for (const entry of host.workers.values()) {
        if (!entry.row) newRow(entry);
      }
      orderDirty = true;
      reorderList();
    }

    // Puts the rows in need order, moving only those out of place.
    function reorderList() {
      orderDirty = false;
      const order = listOrder();
      let current = host.elements.list.firstChild;
      for (const entry of order) {
        if (!entry.row) newRow(entry);
        if (entry.row === current) {
          current = current.nextSibling;
        } else {
          host.elements.list.insertBefore(entry.row, current);
        }
      }
    }

    function fillRow(entry, now) {
      const row = entry.row;
      const cells = entry.cells;
      const isAlerting = alerting.has(entry.id);
      row.dataset.state = entry.state;
      row.dataset.alerting = String(isAlerting);
      row.dataset.seq = entry.position && typeof entry.position.seq === "number"
        ? String(entry.position.seq) : "";
      row.dataset.seqGaps = String(entry.seqGaps);
      cells.icon.textContent = ICONS[entry.state];
      cells.mark.hidden = !isAlerting;
      fillAge(entry, now);
      if (entry.seqGaps > 0) {
        cells.gaps.hidden = false;
        cells.gaps.textContent = "⚠ " + entry.seqGaps + " skipped";
        cells.gaps.title = "the device skipped " + entry.seqGaps + " sequence number(s)";
      }
      const position = entry.position;
      const parts = [];
      if (position && typeof position.speed === "number") {
        parts.push((position.speed * 3.6).toFixed(position.speed < 2.8 ? 1 : 0) + " km/h");
      }
      if (position && typeof position.battery === "number") {
        parts.push("battery " + Math.round(position.battery) + "%");
      }
      cells.detail.textContent = parts.join(" · ");
      row.dataset.battery = position && typeof position.battery === "number"
        ? String(Math.round(position.battery)) : "";
    }

    // "offline · 14:02:31 (3 min ago)": the state in words, last seen as a time and an age.
    function fillAge(entry, now) {
      const seenMs = entry.state === "offline" || entry.state === "off_duty"
        ? Math.max(entry.rxMs || 0, entry.statusMs || 0) : entry.rxMs;
      let text = STATE_WORDS[entry.state];
      if (seenMs) text += " · " + host.seenText(seenMs, now);
      entry.cells.seen.textContent = text;
      entry.cells.button.setAttribute("aria-label", entry.id + ", " + text +
        (alerting.has(entry.id) ? ", has an unacknowledged alert" : "") +
        (entry.cells.detail.textContent ? ", " + entry.cells.detail.textContent : ""));
    }

    function rowVisible(entry) {
      if (!matchesSearch(entry.id)) return false;
      if (filter === null) return true;
      if (filter === "alerting") return alerting.has(entry.id);
      return entry.state === filter;
    }

    function setFilter(state) {
      filter = filter === state ? null : state;
      for (const item of host.elements.countsList.querySelectorAll("button[data-filter]")) {
        item.setAttribute("aria-pressed", String(item.dataset.filter === filter));
      }
      applySearch();
    }

    function matchesSearch(id) {
      const query = host.elements.search.value.trim().toLowerCase();
      return !query || id.toLowerCase().includes(query);
    }

    function applySearch() {
      for (const entry of host.workers.values()) {
        if (entry.row) entry.row.hidden = !rowVisible(entry);
      }
    }

    function updateCounts() {
      const counts = { online: 0, stale: 0, offline: 0, off_duty: 0, unknown: 0 };
      for (const entry of host.workers.values()) counts[entry.state] += 1;
      for (const state of STATES) {
        host.elements.counts[state].textContent = String(counts[state]);
      }
      host.elements.total.textContent = String(host.workers.size);
      const alertCount = document.getElementById("count-alerting");
      alertCount.textContent = String(alerting.size);
      alertCount.closest("li").hidden = !window.teamtrackAlerts;
    }

    function readAlerting() {
      const module = window.teamtrackAlerts;
      const next = module && typeof module.unacknowledged === "function"
        ? new Set(module.unacknowledged()) : new Set();
      for (const id of new Set([...alerting, ...next])) {
        if (host.workers.has(id) && alerting.has(id) !== next.has(id)) host.changed.add(id);
      }
      alerting = next;
      orderDirty = true;
      host.scheduleRender();
    }

    return {
      STATE_WORDS: STATE_WORDS,
      newRow: newRow,
      buildList: buildList,
      reorderList: reorderList,
      fillRow: fillRow,
      fillAge: fillAge,
      rowVisible: rowVisible,
      setFilter: setFilter,
      matchesSearch: matchesSearch,
      applySearch: applySearch,
      updateCounts: updateCounts,
      readAlerting: readAlerting,
      isAlerting: (id) => alerting.has(id),
      markDirty() {
        orderDirty = true;
      },
      dirty: () => orderDirty,
      filter: () => filter,
    };
  }

  return { create: create };
})();
