// The manager's live map: a snapshot (or a resume), then frames over /ws/teams/{team}
// (docs/protocol.md), and the replay of the team's history (replay.js, docs/history.md).
// Plain script, no build step; Leaflet and replay.js are loaded before it.
// Data is only ever written with textContent or as text nodes, never as HTML: Leaflet takes a
// string given to bindTooltip, bindPopup or an attribution as HTML, so none is given one.
"use strict";

(function () {
  const RECONNECT_FIRST_MS = 500;
  const RECONNECT_MAX_MS = 30000;
  const PING_EVERY_MS = 20000;
  // No frame and no pong for this long: the connection is dead even if the browser hasn't noticed.
  const SILENCE_LIMIT_MS = 45000;
  // Connection truth: the header never says "live" for a server that has stopped answering.
  // While the team is active (positions kept arriving), no frame for DELAYED_AFTER_MS reads
  // "delayed"; a quiet team is probed with a ping after PROBE_AFTER_MS of silence, and a ping
  // unanswered for PONG_LIMIT_MS reads "delayed" too. Checked every CHECK_EVERY_MS.
  const DELAYED_AFTER_MS = 5000;
  const PROBE_AFTER_MS = 2000;
  const PONG_LIMIT_MS = 3000;
  const CHECK_EVERY_MS = 250;
  const ACTIVE_FRAMES = 3; // position frames within ACTIVE_WINDOW_MS before the silence
  const ACTIVE_WINDOW_MS = 30000;
  const CLOSE_TOO_SLOW = 4008;
  const CLOSE_REVOKED = 4401; // a logout elsewhere, or the account revoked or rotated
  // Colours chosen apart for the common colour blindnesses; every state also has its own shape
  // (list icons, marker outline), so colour is never the only cue.
  const COLOURS = { online: "#1b7f4a", stale: "#e08a00", offline: "#5f6b7a", off_duty: "#7b52c7",
    unknown: "#2f6fd6" };
  const FOCUS_ZOOM = 16;
  const PANEL_FIXES = 6; // the followed worker's last fixes listed in its panel
  const RENDER_SAMPLES = 240;

  const elements = {
    team: document.getElementById("team"),
    connection: document.getElementById("connection"),
    delay: document.getElementById("delay"),
    notice: document.getElementById("notice"),
    tiles: document.getElementById("tiles-notice"),
    map: document.getElementById("map"),
    search: document.getElementById("search"),
    list: document.getElementById("workers"),
    following: document.getElementById("following"),
    followingName: document.getElementById("following-name"),
    stopFollowing: document.getElementById("stop-following"),
    followPanel: document.getElementById("follow-panel"),
    total: document.getElementById("count"),
    counts: {
      online: document.getElementById("count-online"),
      stale: document.getElementById("count-stale"),
      offline: document.getElementById("count-offline"),
      off_duty: document.getElementById("count-off_duty"),
    },
    countsList: document.getElementById("counts"),
    replay: {
      toggle: document.getElementById("replay-toggle"),
      bar: document.getElementById("replay"),
      range: document.getElementById("replay-range"),
      start: document.getElementById("replay-start"),
      play: document.getElementById("replay-play"),
      speed: document.getElementById("replay-speed"),
      scrubber: document.getElementById("replay-scrubber"),
      alerts: document.getElementById("replay-alerts"),
      clock: document.getElementById("replay-clock"),
      live: document.getElementById("replay-live"),
    },
  };

  let config = { stale_after_s: 30, trail_points: 20, tile_url: "", tile_attribution: "" };
  // worker id -> record; see newRecord().
  const workers = new Map();
  const sortedIds = [];
  const changed = new Set();
  let renderScheduled = false;
  let team = null;
  let socket = null;
  let reconnectDelay = RECONNECT_FIRST_MS;
  let lastHeard = 0;
  let lastFrame = 0; // the last frame other than a pong (this browser's clock)
  let pingSentAt = 0; // an unanswered ping, or 0
  const positionFrames = []; // when the last frames carrying positions came (this browser's clock)
  // Where to resume from after a drop: the cursor of the last frame applied.
  let cursor = null;
  let serverOffsetMs = 0; // server clock minus this browser's, from the frames' "now"
  let followed = null;
  let fitPending = true;
  let map = null;
  // The replay (replay.js): while it plays, the map shows the history and live frames go to it.
  let player = null;
  const stats = {
    frames: { snapshot: 0, resume: 0, events: 0, sync: 0, gap: 0 },
    duplicates: 0,
    seqGaps: 0,
    connections: 0,
    lastClose: null,
    renderMs: [],
  };

  // --- Connection and notices -----------------------------------------------------------
  function setConnection(state) {
    elements.connection.textContent = state;
    elements.connection.dataset.state = state;
  }

  // A notice with `holdMs` stays that long even if the connection recovers meanwhile (a gap
  // is followed by a snapshot at once, and the manager must still get to read about it).
  let noticeHeldUntil = 0;
  function showNotice(text, holdMs) {
    if (!text && Date.now() < noticeHeldUntil) return;
    noticeHeldUntil = holdMs ? Date.now() + holdMs : 0;
    elements.notice.textContent = text;
    elements.notice.hidden = !text;
    if (holdMs) window.setTimeout(() => showNotice(""), holdMs + 50);
  }

  function serverNow() {
    return Date.now() + serverOffsetMs;
  }

  function setServerClock(nowMs) {
    if (typeof nowMs === "number") serverOffsetMs = nowMs - Date.now();
  }

  function replaying() {
    return player !== null && player.active();
  }

  // The time the map shows: now, or the play head while replaying (ages and staleness).
  function viewNow() {
    if (replaying()) return player.now();
    // A delayed server is not a team going stale: ages stop where the last frame left them.
    if (elements.connection.dataset.state === "delayed") return lastFrame + serverOffsetMs;
    return serverNow();
  }

  // --- Workers --------------------------------------------------------------------------
  function newRecord(id) {
    return {
      id: id,
      position: null, // the device payload of the newest fix
      rxMs: null, // when a bridge received that fix (server clock)
      status: null, // "online" | "offline" | null
      statusMs: null,
      trail: [],
      seqGaps: 0, // messages the device never sent (its seq skipped), not ones we lost
      duplicates: 0,
      state: "unknown",
      marker: null,
      trailLine: null,
      cluster: null, // the cluster it is counted in (markers.js), off the map itself
      row: null,
      cells: null,
      origin: null, // the bridge ("b…") or HTTP gateway ("g…") that received the newest fix
      fixes: [], // the last PANEL_FIXES fixes: {position, rxMs}
      label: null,
    };
  }

  function record(id) {
    let entry = workers.get(id);
    if (!entry) {
      entry = newRecord(id);
      workers.set(id, entry);
      sortedIds.splice(insertionIndex(id), 0, id);
    }
    return entry;
  }

  function insertionIndex(id) {
    let low = 0;
    let high = sortedIds.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (sortedIds[middle] < id) low = middle + 1;
      else high = middle;
    }
    return low;
  }

  function stateOf(entry, now) {
    const statusNewer = entry.rxMs === null || entry.statusMs >= entry.rxMs;
    if (entry.status === "offline" && statusNewer) return "offline";
    // Off duty (paused by the device, or outside its shift) until a later position or "online".
    if (entry.status === "off_duty" && statusNewer) return "off_duty";
    if (entry.position === null) return entry.status === "online" ? "online" : "unknown";
    if (now - entry.rxMs > config.stale_after_s * 1000) return "stale";
    return "online";
  }

  // `continuous`: nothing between the previous fix and this one was skipped by the platform,
  // so a jump in seq means the device itself skipped (shown, never hidden).
  function applyPosition(entry, position, rxMs, continuous) {
    const previous = entry.position;
    if (previous && typeof position.seq === "number" && typeof previous.seq === "number") {
      if (position.seq <= previous.seq && position.ts <= previous.ts) {
        entry.duplicates += 1; // already shown (or older than what is shown)
        stats.duplicates += 1;
        return false;
      }
      if (continuous && position.seq > previous.seq + 1) {
        const missed = position.seq - previous.seq - 1;
        entry.seqGaps += missed;
        stats.seqGaps += missed;
      }
    }
    entry.position = position;
    entry.rxMs = rxMs;
    entry.fixes.push({ position: position, rxMs: rxMs });
    if (entry.fixes.length > PANEL_FIXES) entry.fixes.shift();
    entry.trail.push([position.lat, position.lon]);
    const excess = entry.trail.length - Math.max(config.trail_points, 1);
    if (excess > 0) entry.trail.splice(0, excess);
    return true;
  }

  function clearWorkers() {
    for (const entry of workers.values()) markers.remove(entry);
    markers.clear();
    workers.clear();
    sortedIds.length = 0;
    changed.clear();
    elements.list.replaceChildren();
  }

  // --- Frames ---------------------------------------------------------------------------
  function applySnapshot(frame) {
    clearWorkers();
    setServerClock(frame.now);
    for (const item of frame.workers) {
      const entry = record(item.worker);
      if (item.position) applyPosition(entry, item.position, item.received_ms, false);
      entry.origin = item.origin || null;
      entry.status = item.status;
      entry.statusMs = item.status_ms;
      changed.add(item.worker);
    }
    fitPending = true;
    showDelay(frame.workers.map((item) => item.position));
    list.buildList();
    scheduleRender();
  }

  function applyEvents(events, continuous) {
    const positions = [];
    for (const event of events) {
      const entry = record(event.w);
      if (event.k === "p") {
        if (applyPosition(entry, event.p, event.rx, continuous)) {
          positions.push(event.p);
          entry.origin = event.o || null;
        }
      } else if (event.k === "s") {
        entry.status = event.p;
        entry.statusMs = event.rx;
      }
      changed.add(event.w);
    }
    showDelay(positions);
    scheduleRender();
  }

  function onFrame(message) {
    const arrived = Date.now();
    lastHeard = arrived;
    pingSentAt = 0;
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch (error) {
      return;
    }
    if (frame.type === "pong") {
      if (elements.connection.dataset.state === "delayed" && !serverQuietWhileActive(arrived)) {
        setConnection("live");
      }
      return;
    }
    lastFrame = arrived;
    if (elements.connection.dataset.state === "delayed") setConnection("live");
    if ((frame.type === "events" || frame.type === "sync") && frame.events.some((e) => e.k === "p")) {
      positionFrames.push(arrived);
      if (positionFrames.length > ACTIVE_FRAMES) positionFrames.shift();
    }
    if (frame.type in stats.frames) stats.frames[frame.type] += 1;
    if (frame.type === "snapshot") {
      setServerClock(frame.now);
      // While replaying, the live state is held by the player until the play head reaches now.
      if (!(replaying() && player.liveSnapshot(liveWorkersOf(frame)))) applySnapshot(frame);
      becameLive();
    } else if (frame.type === "resume") {
      setServerClock(frame.now);
      becameLive();
    } else if (frame.type === "events") {
      if (replaying()) player.liveEvents(frame.events, true);
      else applyEvents(frame.events, true);
    } else if (frame.type === "sync") {
      // The server skipped what this browser was too slow for: latest state, no seq gaps.
      setServerClock(frame.now);
      if (replaying()) player.liveEvents(frame.events, false);
      else applyEvents(frame.events, false);
      showNotice("This connection fell behind; it skipped to the latest positions.", 8000);
    } else if (frame.type === "gap") {
      showNotice("Some updates were lost for good; the map was reloaded.", 15000);
    }
    if (typeof frame.cursor === "string") cursor = frame.cursor;
    // alerts hook: other page modules (alerts.js) see every frame once it is applied.
    window.dispatchEvent(new CustomEvent("teamtrack:frame", { detail: frame }));
  }

  function becameLive() {
    setConnection("live");
    showNotice("");
    reconnectDelay = RECONNECT_FIRST_MS;
  }

  function showDelay(positions) {
    if (replaying()) return;
    let newest = null;
    for (const position of positions) {
      if (position && (newest === null || position.ts > newest)) newest = position.ts;
    }
    if (newest !== null) elements.delay.textContent = formatDuration(Date.now() - newest);
  }

  // A wall-clock time of this browser's zone for a server-clock instant, e.g. "14:02:31".
  // (By hand: toLocaleTimeString costs a formatter per call, too slow for 2,000 rows a second.)
  function clockTime(ms) {
    const date = new Date(ms - serverOffsetMs);
    const two = (value) => (value < 10 ? "0" : "") + value;
    return two(date.getHours()) + ":" + two(date.getMinutes()) + ":" + two(date.getSeconds());
  }

  // "14:02:31 (12 s ago)"
  function seenText(ms, now) {
    const age = now - ms;
    return clockTime(ms) + " (" + (age < 1000 ? "just now" : formatAge(age) + " ago") + ")";
  }

  function formatAge(ms) {
    if (ms < 1000) return "now";
    if (ms < 120000) return Math.round(ms / 1000) + " s";
    return formatDuration(ms);
  }

  function formatDuration(ms) {
    if (ms < 0) ms = 0;
    if (ms < 10000) return ms + " ms";
    if (ms < 120000) return Math.round(ms / 1000) + " s";
    if (ms < 7200000) return Math.round(ms / 60000) + " min";
    return Math.round(ms / 3600000) + " h";
  }

  // --- Map ------------------------------------------------------------------------------
  function createMap() {
    if (!window.L) {
      elements.map.hidden = true;
      document.body.classList.add("no-map");
      showNotice("The map library is not installed (run `make assets`); showing the list only.");
      return;
    }
    map = L.map(elements.map, { preferCanvas: true, worldCopyJump: true, zoomControl: true });
    markers.attach(map);
    window.TeamtrackTiles.add(map, config, elements.tiles);
    map.setView([20, 0], 2);
    map.on("dragstart", stopFollowing);
    map.on("moveend", () => followView.updateLabels());
  }

  function fitToWorkers() {
    if (!map) return;
    const points = markers.points();
    if (points.length === 0) return;
    fitPending = false;
    map.fitBounds(L.latLngBounds(points), { padding: [30, 30], maxZoom: FOCUS_ZOOM });
  }

  function follow(id) {
    const previous = followed;
    followed = id;
    for (const name of [previous, id]) {
      const entry = name && workers.get(name);
      if (entry) {
        markers.restyle(entry);
        if (entry.row) entry.row.classList.toggle("selected", name === followed);
      }
    }
    elements.following.hidden = false;
    elements.followingName.textContent = id;
    followView.fillPanel();
    const entry = workers.get(id);
    if (map && entry && entry.position) {
      map.setView([entry.position.lat, entry.position.lon], Math.max(map.getZoom(), FOCUS_ZOOM));
      markers.recluster(); // a followed worker is never in a cluster
      if (entry.marker) entry.marker.bringToFront();
    }
  }

  function stopFollowing() {
    if (followed === null) return;
    const entry = workers.get(followed);
    followed = null;
    elements.following.hidden = true;
    followView.fillPanel();
    if (entry) {
      markers.restyle(entry);
      if (entry.row) entry.row.classList.remove("selected");
    }
  }

  // --- Markers, trails and clusters (markers.js) ----------------------------------------
  const markers = window.TeamtrackMarkers.create({
    workers: workers,
    map: () => map,
    followed: () => followed,
    follow: (id) => follow(id),
    colours: COLOURS,
    viewNow: viewNow,
    formatAge: formatAge,
    isAlerting: (id) => list.isAlerting(id),
  });

  // --- The followed worker's panel and the map's labels (follow.js) ----------------------
  const followView = window.TeamtrackFollow.create({
    workers: workers,
    panel: elements.followPanel,
    map: () => map,
    team: () => team,
    config: () => config,
    followed: () => followed,
    viewNow: viewNow,
    serverNow: serverNow,
    clockTime: clockTime,
    seenText: seenText,
    colours: COLOURS,
    stateWords: () => list.STATE_WORDS,
  });

  // --- Side list (list.js) --------------------------------------------------------------
  const list = window.TeamtrackList.create({
    workers: workers,
    sortedIds: sortedIds,
    elements: elements,
    changed: changed,
    follow: (id) => follow(id),
    scheduleRender: () => scheduleRender(),
    seenText: seenText,
  });

  // --- Rendering ------------------------------------------------------------------------
  function scheduleRender() {
    if (!renderScheduled) {
      renderScheduled = true;
      window.requestAnimationFrame(render);
    }
  }

  function render() {
    const started = performance.now();
    renderScheduled = false;
    const now = viewNow();
    const changedFollowed = followed !== null && changed.has(followed);
    for (const id of changed) {
      const entry = workers.get(id);
      if (!entry) continue;
      const state = stateOf(entry, now);
      const styleChanged = state !== entry.state || !entry.marker;
      if (state !== entry.state || !entry.row) list.markDirty();
      entry.state = state;
      markers.draw(entry, styleChanged);
      if (!entry.row) list.newRow(entry);
      list.fillRow(entry, now);
      if (list.filter() !== null) entry.row.hidden = !list.rowVisible(entry);
      if (id === followed && map && entry.position) {
        map.panTo([entry.position.lat, entry.position.lon], { animate: false });
      }
    }
    changed.clear();
    if (list.dirty()) list.reorderList();
    if (followed !== null && changedFollowed) followView.fillPanel();
    if (fitPending) fitToWorkers();
    list.updateCounts();
    stats.renderMs.push(performance.now() - started);
    if (stats.renderMs.length > RENDER_SAMPLES) stats.renderMs.shift();
  }

  // Staleness comes from the passing of time, not from frames: look at every worker each second.
  function refreshStates() {
    const now = viewNow();
    for (const entry of workers.values()) {
      if (stateOf(entry, now) !== entry.state) changed.add(entry.id);
      else if (entry.row) list.fillAge(entry, now);
    }
    if (changed.size) scheduleRender();
    else if (followed !== null) followView.fillPanel(); // its ages
    followView.updateLabels();
  }

  // --- Replay ---------------------------------------------------------------------------
  function liveWorkersOf(snapshot) {
    return snapshot.workers.map((item) => ({
      worker: item.worker,
      position: item.position,
      rxMs: item.received_ms,
      status: item.status,
      statusMs: item.status_ms,
    }));
  }

  // What replay.js may do to the map.
  const replayHost = {
    team: () => team,
    serverNow: serverNow,
    fetchJson: getJson,
    liveWorkers() {
      return sortedIds.map((id) => {
        const entry = workers.get(id);
        return { worker: id, position: entry.position, rxMs: entry.rxMs,
          status: entry.status, statusMs: entry.statusMs };
      });
    },
    begin() {
      clearWorkers();
      fitPending = true;
      elements.delay.textContent = "–"; // of live frames: back with the first one after
      replayBar.showControls(true);
      scheduleRender(); // the counts follow the emptied list at once
    },
    applyPosition(worker, position, rxMs, continuous) {
      changed.add(worker);
      return applyPosition(record(worker), position, rxMs, continuous);
    },
    applyStatus(worker, word, ms) {
      const entry = record(worker);
      entry.status = word;
      entry.statusMs = ms;
      changed.add(worker);
    },
    lastPosition(worker) {
      const entry = workers.get(worker);
      return entry ? entry.position : null;
    },
    changed() {
      if (changed.size) scheduleRender();
    },
    progress: () => replayBar.showProgress(),
    notice(text) {
      showNotice(text, 15000);
    },
    // The play head reached now and the live stream took over.
    finished() {
      replayBar.showControls(false);
      for (const id of sortedIds) changed.add(id);
      scheduleRender();
      showNotice("The replay reached now: live again.", 4000);
    },
    failed() {
      replayBar.showControls(false);
      reloadLive();
    },
  };

  // --- The replay's bar: range, play, speed, scrubber, alert marks (replay_bar.js) --------
  const replayBar = window.TeamtrackReplayBar.create({
    controls: elements.replay,
    team: () => team,
    serverNow: serverNow,
    fetchJson: getJson,
    clockTime: clockTime,
    formatDuration: formatDuration,
    reloadLive: () => reloadLive(),
    createPlayer: () => window.TeamtrackReplay.createPlayer(replayHost),
  });

  // --- Socket ---------------------------------------------------------------------------
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
        window.location.assign("/login");
        return;
      }
      connect();
    }, delay);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    let url = `${scheme}://${window.location.host}/ws/teams/${encodeURIComponent(team)}`;
    if (cursor !== null) url += `?after=${encodeURIComponent(cursor)}`;
    setConnection(socket ? "reconnecting" : "connecting");
    const current = new WebSocket(url);
    socket = current;
    stats.connections += 1;
    lastHeard = Date.now();
    lastFrame = lastHeard;
    pingSentAt = 0;
    positionFrames.length = 0;
    current.onmessage = onFrame;
    current.onclose = (event) => {
      if (socket !== current) return;
      stats.lastClose = event.code;
      if (event.code === CLOSE_REVOKED) {
        window.location.assign("/login");
        return;
      }
      if (event.code === CLOSE_TOO_SLOW) {
        // Resuming would replay the very backlog this browser could not take: start over.
        cursor = null;
        showNotice("This connection fell too far behind; reloading the team.");
        reconnectDelay = RECONNECT_FIRST_MS;
      }
      scheduleReconnect();
    };
  }

  // A new connection without cursor: its snapshot replaces the view.
  function reloadLive() {
    const previous = socket;
    socket = null;
    cursor = null;
    if (previous) previous.close();
    connect();
  }

  function sendPing(now) {
    socket.send(JSON.stringify({ type: "ping" }));
    if (pingSentAt === 0) pingSentAt = now;
  }

  function keepAlive() {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastHeard > SILENCE_LIMIT_MS) {
      socket.close();
      return;
    }
    sendPing(Date.now());
  }

  // Positions were flowing (ACTIVE_FRAMES frames within ACTIVE_WINDOW_MS) and then stopped.
  function serverQuietWhileActive(now) {
    if (now - lastFrame < DELAYED_AFTER_MS) return false;
    return positionFrames.length >= ACTIVE_FRAMES &&
      lastFrame - positionFrames[0] <= ACTIVE_WINDOW_MS;
  }

  function checkConnection() {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    const state = elements.connection.dataset.state;
    if (state !== "live" && state !== "delayed") return;
    const now = Date.now();
    if (now - lastHeard >= PROBE_AFTER_MS && pingSentAt === 0) sendPing(now);
    const unanswered = pingSentAt !== 0 && now - pingSentAt > PONG_LIMIT_MS;
    const delayed = unanswered || serverQuietWhileActive(now);
    if (delayed && state === "live") {
      setConnection("delayed");
      for (const id of sortedIds) changed.add(id);
      scheduleRender();
    } else if (!delayed && state === "delayed") {
      setConnection("live");
    }
    if (delayed) {
      elements.delay.textContent = "no frame for " + formatDuration(now - lastFrame);
      elements.connection.title = "no word from the server for " +
        formatDuration(now - lastHeard) + "; positions shown are as of " + clockTime(lastFrame);
    } else {
      elements.connection.title = "";
    }
  }

  // --- Start ----------------------------------------------------------------------------
  async function getJson(path) {
    const response = await fetch(path, { credentials: "same-origin" });
    if (response.status === 401) {
      window.location.assign("/login");
      throw new Error("signed out");
    }
    if (!response.ok) {
      const error = new Error(`${path}: ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  async function start() {
    const [me, settings] = await Promise.all([getJson("/api/me"), getJson("/api/config")]);
    team = me.team;
    config = settings;
    elements.team.textContent = team;
    document.title = `teamtrack — ${team}`;
    createMap();
    elements.search.addEventListener("input", list.applySearch);
    elements.search.addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      const visible = sortedIds.filter((id) => list.matchesSearch(id));
      if (visible.length === 1) follow(visible[0]);
    });
    elements.stopFollowing.addEventListener("click", stopFollowing);
    for (const item of elements.countsList.querySelectorAll("button[data-filter]")) {
      item.addEventListener("click", () => list.setFilter(item.dataset.filter));
    }
    window.addEventListener("teamtrack:alerts-changed", list.readAlerting);
    list.readAlerting();
    player = replayBar.setUp(config.history);
    connect();
    window.setInterval(refreshStates, 1000);
    window.setInterval(keepAlive, PING_EVERY_MS);
    window.setInterval(checkConnection, CHECK_EVERY_MS);
  }

  function retryStart() {
    setConnection("reconnecting");
    window.setTimeout(() => start().catch(retryStart), RECONNECT_MAX_MS / 10);
  }

  function onMap(entry) {
    return Boolean(map && entry.marker && (entry.cluster || map.hasLayer(entry.marker)));
  }

  // For tests and for operators at the console: what the page believes, without reading pixels.
  window.teamtrack = {
    // alerts hook: the Leaflet map and the team, for alerts.js.
    get map() { return map; },
    get team() { return team; },
    state() {
      return {
        team: team,
        connection: elements.connection.dataset.state,
        tiles: document.body.dataset.tiles || null,
        filter: list.filter(),
        listOrder: Array.from(elements.list.children).filter((row) => !row.hidden)
          .map((row) => row.dataset.worker),
        mode: replaying() ? "replay" : "live",
        replay: player ? player.state() : null,
        cursor: cursor,
        frames: Object.assign({}, stats.frames),
        duplicates: stats.duplicates,
        seqGaps: stats.seqGaps,
        connections: stats.connections,
        lastClose: stats.lastClose,
        // Workers drawn on the map: on their own, or counted in a cluster's circle.
        markersOnMap: sortedIds.filter((id) => onMap(workers.get(id))).length,
        clusters: markers.clusterCount(),
        clustered: markers.clusteredCount(),
        workers: sortedIds.map((id) => {
          const entry = workers.get(id);
          return {
            id: id,
            state: entry.state,
            lat: entry.position ? entry.position.lat : null,
            lon: entry.position ? entry.position.lon : null,
            seq: entry.position ? entry.position.seq : null,
            seqGaps: entry.seqGaps,
            duplicates: entry.duplicates,
            trail: entry.trail.length,
            onMap: onMap(entry),
            clustered: Boolean(entry.cluster),
            labelled: Boolean(entry.label),
          };
        }),
      };
    },
    renderStats() {
      const samples = stats.renderMs.slice().sort((a, b) => a - b);
      const pick = (q) => (samples.length ? samples[Math.floor(q * (samples.length - 1))] : null);
      return { count: samples.length, medianMs: pick(0.5), p95Ms: pick(0.95), maxMs: pick(1) };
    },
  };

  start().catch(retryStart);
})();
