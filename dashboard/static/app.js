// The live team table: a snapshot, then event frames over /ws/teams/{team} (docs/protocol.md).
// Plain script, no build step. Data is only ever written with textContent, never as HTML.
"use strict";

(function () {
  const RECONNECT_FIRST_MS = 500;
  const RECONNECT_MAX_MS = 30000;
  const PING_EVERY_MS = 20000;
  // No frame and no pong for this long: the connection is dead even if the browser hasn't noticed.
  const SILENCE_LIMIT_MS = 45000;

  const elements = {
    team: document.getElementById("team"),
    connection: document.getElementById("connection"),
    delay: document.getElementById("delay"),
    count: document.getElementById("count"),
    notice: document.getElementById("notice"),
    rows: document.getElementById("workers"),
  };

  // worker -> {position, receivedMs, status, row}
  const workers = new Map();
  const changed = new Set();
  let renderScheduled = false;
  let team = null;
  let socket = null;
  let reconnectDelay = RECONNECT_FIRST_MS;
  let lastHeard = 0;

  function setConnection(state) {
    elements.connection.textContent = state;
    elements.connection.dataset.state = state;
  }

  function showNotice(text) {
    elements.notice.textContent = text;
    elements.notice.hidden = !text;
  }

  function toLogin() {
    window.location.assign("/login");
  }

  function worker(name) {
    let entry = workers.get(name);
    if (!entry) {
      entry = { position: null, receivedMs: null, status: null, row: null };
      workers.set(name, entry);
    }
    return entry;
  }

  function markChanged(name) {
    changed.add(name);
    if (!renderScheduled) {
      renderScheduled = true;
      window.requestAnimationFrame(render);
    }
  }

  function applySnapshot(frame) {
    for (const entry of workers.values()) {
      if (entry.row) entry.row.remove();
    }
    workers.clear();
    changed.clear();
    for (const item of frame.workers) {
      const entry = worker(item.worker);
      entry.position = item.position;
      entry.receivedMs = item.received_ms;
      entry.status = item.status;
      markChanged(item.worker);
    }
    showDelay(frame.workers.map((item) => item.position));
  }

  function applyEvents(frame) {
    const positions = [];
    for (const event of frame.events) {
      const entry = worker(event.w);
      if (event.k === "p") {
        // Several fixes of one worker can share a frame; the table shows the newest.
        if (!entry.position || entry.position.ts <= event.p.ts) {
          entry.position = event.p;
          entry.receivedMs = event.rx;
        }
        positions.push(event.p);
      } else if (event.k === "s") {
        entry.status = event.p;
      }
      markChanged(event.w);
    }
    showDelay(positions);
  }

  function showDelay(positions) {
    let newest = null;
    for (const position of positions) {
      if (position && (newest === null || position.ts > newest)) newest = position.ts;
    }
    if (newest !== null) {
      elements.delay.textContent = formatDuration(Date.now() - newest);
    }
  }

  function formatDuration(ms) {
    if (ms < 0) ms = 0;
    if (ms < 10000) return ms + " ms";
    if (ms < 120000) return Math.round(ms / 1000) + " s";
    if (ms < 7200000) return Math.round(ms / 60000) + " min";
    return Math.round(ms / 3600000) + " h";
  }

  function number(value, digits) {
    return typeof value === "number" ? value.toFixed(digits) : "";
  }

  function newRow(name) {
    const row = document.createElement("tr");
    for (let i = 0; i < 8; i++) row.appendChild(document.createElement("td"));
    row.cells[0].textContent = name;
    // Keep the table sorted by worker: insert before the first row with a larger name.
    let before = null;
    for (const candidate of elements.rows.rows) {
      if (candidate.cells[0].textContent > name) {
        before = candidate;
        break;
      }
    }
    elements.rows.insertBefore(row, before);
    return row;
  }

  function fillRow(name, entry) {
    if (!entry.row) entry.row = newRow(name);
    const cells = entry.row.cells;
    const position = entry.position || {};
    cells[1].textContent = number(position.lat, 5);
    cells[2].textContent = number(position.lon, 5);
    cells[3].textContent = number(position.speed, 1);
    cells[4].textContent = number(position.battery, 0);
    cells[5].textContent = typeof position.seq === "number" ? String(position.seq) : "";
    cells[7].textContent = entry.status || "";
    entry.row.dataset.status = entry.status || "unknown";
    fillAge(entry);
  }

  function fillAge(entry) {
    const ts = entry.position && entry.position.ts;
    entry.row.cells[6].textContent = typeof ts === "number" ? formatDuration(Date.now() - ts) : "";
  }

  function render() {
    renderScheduled = false;
    for (const name of changed) {
      const entry = workers.get(name);
      if (entry) fillRow(name, entry);
    }
    changed.clear();
    elements.count.textContent = String(workers.size);
  }

  function refreshAges() {
    for (const entry of workers.values()) {
      if (entry.row) fillAge(entry);
    }
  }

  function onFrame(message) {
    lastHeard = Date.now();
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch (error) {
      return;
    }
    if (frame.type === "snapshot") {
      applySnapshot(frame);
      setConnection("live");
      showNotice("");
      reconnectDelay = RECONNECT_FIRST_MS;
    } else if (frame.type === "events") {
      applyEvents(frame);
    } else if (frame.type === "gap") {
      showNotice("Some updates were lost; the table was reloaded.");
    }
  }

  async function stillLoggedIn() {
    try {
      const response = await fetch("/api/me", { credentials: "same-origin" });
      return response.status !== 401;
    } catch (error) {
      return true; // the server is unreachable, not refusing us: keep trying
    }
  }

  function scheduleReconnect() {
    setConnection("reconnecting");
    const delay = reconnectDelay * (0.8 + Math.random() * 0.4);
    reconnectDelay = Math.min(reconnectDelay * 2, RECONNECT_MAX_MS);
    window.setTimeout(async () => {
      // A refused handshake looks like any other failure to a browser: ask the API why.
      if (!(await stillLoggedIn())) {
        toLogin();
        return;
      }
      connect();
    }, delay);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${window.location.host}/ws/teams/${encodeURIComponent(team)}`;
    setConnection(socket ? "reconnecting" : "connecting");
    const current = new WebSocket(url);
    socket = current;
    lastHeard = Date.now();
    current.onmessage = onFrame;
    current.onclose = (event) => {
      if (socket !== current) return;
      if (event.code === 4008) {
        showNotice("This browser fell behind; reloading the team.");
        reconnectDelay = RECONNECT_FIRST_MS;
      }
      scheduleReconnect();
    };
  }

  function keepAlive() {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastHeard > SILENCE_LIMIT_MS) {
      socket.close();
      return;
    }
    socket.send(JSON.stringify({ type: "ping" }));
  }

  async function start() {
    const response = await fetch("/api/me", { credentials: "same-origin" });
    if (response.status === 401) {
      toLogin();
      return;
    }
    const me = await response.json();
    team = me.team;
    elements.team.textContent = team;
    document.title = `teamtrack — ${team}`;
    connect();
    window.setInterval(refreshAges, 1000);
    window.setInterval(keepAlive, PING_EVERY_MS);
  }

  start().catch(() => scheduleReconnectStart());

  function scheduleReconnectStart() {
    setConnection("reconnecting");
    window.setTimeout(() => start().catch(scheduleReconnectStart), RECONNECT_MAX_MS / 10);
  }
})();
