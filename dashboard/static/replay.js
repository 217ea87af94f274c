// Replay: the team's movements from the history (GET /api/teams/{team}/history) played on the
// map at 1x to 60x, joined to the live stream without a gap when the play head reaches now
// (docs/history.md, "Replay on the map"). Plain script, loaded before app.js, which creates the
// player with a `host`: the map's workers, its clock and its fetch.
//
// The seam. The live socket stays connected while replaying; its events are held in a bounded
// ring, after the live view's own positions at the moment the replay began (the "seeds"). The
// live view was complete up to its cursor and the ring is complete after it, so what the replay
// needs from the history is, per worker, everything before the first position the ring holds
// of it. The history lags the backend (the ingest writes a moment later), so at the seam the
// player reads the last stretch of history again until, for every worker, it reaches that
// first position (or holds the position right before it), then plays the rest of the history
// and the ring merged by fix time, and hands over to live.
"use strict";

window.TeamtrackReplay = (function () {
  const SPEEDS = [1, 2, 5, 10, 30, 60];
  const PAGE_SIZE = 5000; // positions per history request
  const REFILL_BELOW = 2500; // the next page is fetched when fewer are queued ahead of the head
  // History older than this is taken as complete: the ingest writes within it. Newer history is
  // read again at the seam until it meets the live stream.
  const SETTLE_MS = 10000;
  const SEEK_LEAD_MS = 1000; // the play head starts this long before the first stored fix
  const MIN_WINDOW_MS = 2000; // a shorter stretch of settled history is left to the seam
  const JOIN_POLL_MS = 300;
  // How long the seam waits for the history to meet the live stream; after that it joins, and
  // what never arrived shows as skipped seqs (never hidden).
  const JOIN_WAIT_MS = 15000;
  const FUTURE_SLACK_MS = 60000; // fixes of device clocks ahead of the server's
  const RING_LIMIT = 50000; // live events held while replaying
  const TICK_MS = 50;
  const RETRY_DELAYS_MS = [500, 1000, 2000, 4000];

  // a comes before b in one worker's reports: an older fix, or the same time and a lower seq.
  function before(a, b) {
    return a.ts < b.ts || (a.ts === b.ts && a.seq < b.seq);
  }

  // What the map would drop as already shown (the page's duplicate rule).
  function alreadyShown(position, shown) {
    return shown !== null && position.seq <= shown.seq && position.ts <= shown.ts;
  }

  // A stored position (history API) as the device payload the map applies.
  function payloadOf(stored) {
    const payload = { lat: stored.lat, lon: stored.lon, ts: stored.ts, seq: stored.seq };
    for (const name of ["acc", "speed", "heading", "battery"]) {
      if (stored[name] !== null && stored[name] !== undefined) payload[name] = stored[name];
    }
    return payload;
  }

  function sleep(ms) {
    return new Promise((resolve) => window.setTimeout(resolve, ms));
  }

  function createPlayer(host) {
    let phase = "idle"; // idle | history | waiting (for the history, at the seam) | seam
    let playing = false;
    let speed = 10;
    let since = 0;
    let head = 0; // the play head: a fix time, epoch ms
    let lastWall = 0;
    let timer = null;
    // Bumped by every start and by leaving: answers to an older run's requests are dropped.
    let generation = 0;
    // Settled history ahead of the play head: window [windowSince, windowUntil), page by page.
    let queue = [];
    let queueIndex = 0;
    let windowSince = 0;
    let windowUntil = 0;
    let nextPage = null;
    let windowRead = false;
    let fetching = null; // the generation whose page request is in flight
    // The first page after a start moves the play head to the first stored fix (an empty hour
    // is not played out); an empty window says so.
    let seekToData = false;
    // Presence changes of the window being played ([{worker, ts, status}], by time).
    let presence = [];
    let presenceIndex = 0;
    // The live side: seeds, then every live event since; statuses per worker.
    let ring = [];
    let ringIndex = 0;
    const dropped = new Set(); // workers some of whose ring events were dropped (ring full)
    const statuses = new Map();
    // The seam.
    let joinFrom = 0;
    let joinHistory = [];
    let joinIndex = 0;
    let waitStarted = 0;
    const stats = {
      played: 0, // positions applied from the history
      presencePlayed: 0, // presence changes applied from the history
      seekedTo: null, // where the first page moved the play head (the first stored fix)
      pages: 0,
      ringDropped: 0,
      seamPolls: 0, // history reads at the seam that did not yet meet the live stream
      seamWaitMs: 0,
      seamUncovered: 0, // workers joined before the history met the live stream
      seamOverlap: 0, // live positions the history had already shown
      joins: 0,
    };

    // --- Live side ------------------------------------------------------------------------
    function seed(liveWorkers) {
      ring = [];
      ringIndex = 0;
      dropped.clear();
      statuses.clear();
      for (const item of liveWorkers) {
        if (item.position) {
          ring.push({ w: item.worker, k: "p", p: item.position, rx: item.rxMs,
            t: item.position.ts, continuous: true, seed: true });
        }
        if (item.status) statuses.set(item.worker, { status: item.status, ms: item.statusMs });
      }
    }

    function liveEvents(events, continuous) {
      for (const event of events) {
        if (event.k === "s") statuses.set(event.w, { status: event.p, ms: event.rx });
        ring.push({ w: event.w, k: event.k, p: event.p, rx: event.rx,
          t: event.k === "p" ? event.p.ts : event.rx, continuous: continuous, seed: false });
      }
      if (ring.length <= RING_LIMIT) return;
      if (phase === "seam") {
        finish(); // the play head is about to meet them anyway: apply them now
        return;
      }
      // The oldest go: by the time the play head reaches now, the history holds them.
      const excess = ring.length - Math.floor(RING_LIMIT * 0.9);
      for (let index = 0; index < excess; index++) {
        if (ring[index].k === "p") dropped.add(ring[index].w);
      }
      ring.splice(0, excess);
      stats.ringDropped += excess;
    }

    // A snapshot while replaying (after a gap, or a reconnect without cursor): the live state
    // starts again from it. Returns false when the map must apply it itself (at the seam).
    function liveSnapshot(liveWorkers) {
      if (phase === "seam") {
        finish();
        return false;
      }
      seed(liveWorkers);
      return true;
    }

    // --- History side ---------------------------------------------------------------------
    function fail(error) {
      const reason = error.status ? `HTTP ${error.status}` : "no answer";
      host.notice(`The history is unavailable (${reason}); back to live.`);
      stop();
      host.failed();
    }

    async function withRetries(mine, request) {
      for (let attempt = 0; ; attempt++) {
        try {
          return await request();
        } catch (error) {
          if (mine !== generation) throw error;
          if (attempt >= RETRY_DELAYS_MS.length) {
            fail(error);
            throw error;
          }
          await sleep(RETRY_DELAYS_MS[attempt]);
          if (mine !== generation) throw error;
        }
      }
    }

    function windowPath(from, until, after) {
      let path = `/api/teams/${encodeURIComponent(host.team())}/history` +
        `?since=${Math.floor(from)}&until=${Math.floor(until)}&limit=${PAGE_SIZE}`;
      if (after) path += `&after=${encodeURIComponent(after)}`;
      return path;
    }

    function openWindow(from) {
      const until = host.serverNow() - SETTLE_MS;
      if (until - from < MIN_WINDOW_MS) {
        startJoin(from);
        return;
      }
      windowSince = from;
      windowUntil = until;
      nextPage = null;
      windowRead = false;
      fetchPage();
      fetchPresence(from, until);
    }

    // The window's presence changes (one page of up to PAGE_SIZE; beyond it, a window that
    // busy plays positions only).
    function fetchPresence(from, until) {
      const mine = generation;
      const path = `/api/teams/${encodeURIComponent(host.team())}/presence` +
        `?since=${Math.floor(from)}&until=${Math.floor(until)}&limit=${PAGE_SIZE}`;
      host.fetchJson(path).then((document) => {
        if (mine !== generation) return;
        presence = presence.slice(presenceIndex).concat(document.changes);
        presenceIndex = 0;
      }).catch(() => {});
    }

    function clockText(ms) {
      return new Date(ms).toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit" });
    }

    function fetchPage() {
      if (windowRead || fetching === generation) return;
      const mine = generation;
      fetching = mine;
      const path = windowPath(windowSince, windowUntil, nextPage);
      withRetries(mine, () => host.fetchJson(path)).then((document) => {
        if (mine !== generation) return;
        if (queueIndex > 0) {
          queue = queue.slice(queueIndex);
          queueIndex = 0;
        }
        for (const stored of document.positions) queue.push(stored);
        nextPage = document.next;
        windowRead = document.next === null;
        stats.pages += 1;
        if (seekToData) {
          seekToData = false;
          if (document.positions.length > 0) {
            const first = document.positions[0].ts;
            if (first - SEEK_LEAD_MS > head) {
              head = first - SEEK_LEAD_MS;
              stats.seekedTo = head;
            }
          } else if (windowRead) {
            host.notice(`No history between ${clockText(windowSince)} and ` +
              `${clockText(windowUntil)}: playing from ${clockText(windowUntil)}.`);
            head = windowUntil;
            stats.seekedTo = head;
          }
        }
      }).catch(() => {}).finally(() => {
        if (fetching === mine) fetching = null;
      });
    }

    // How far the play head may go on what has been read: a page's last fix, or the window's end.
    function readUntil() {
      if (windowRead) return windowUntil;
      if (queueIndex < queue.length) return queue[queue.length - 1].ts;
      return head;
    }

    function playHistory(limit) {
      while (presenceIndex < presence.length && presence[presenceIndex].ts <= limit) {
        const change = presence[presenceIndex];
        presenceIndex += 1;
        host.applyStatus(change.worker, change.status, change.ts);
        stats.presencePlayed += 1;
      }
      while (queueIndex < queue.length && queue[queueIndex].ts <= limit) {
        const stored = queue[queueIndex];
        queueIndex += 1;
        host.applyPosition(stored.worker, payloadOf(stored), stored.ts, true);
        stats.played += 1;
      }
    }

    // --- The seam -------------------------------------------------------------------------
    function firstLivePositions() {
      const firsts = new Map();
      for (const item of ring) {
        if (item.k === "p" && !firsts.has(item.w)) firsts.set(item.w, item);
      }
      return firsts;
    }

    // Whether the history holds every position of `worker` before `first`, the first one the
    // live side has of it.
    function covered(worker, first, stretch) {
      if (!dropped.has(worker)) {
        // The live view had no position of it when the replay began: nothing was missed.
        if (!first.seed) return true;
        // Its position then was older than the replay: the replay has nothing before it.
        if (first.p.ts < since) return true;
      }
      const shown = host.lastPosition(worker);
      let newestBefore = shown !== null && before(shown, first.p) ? shown : null;
      if (shown !== null && !newestBefore) return true; // the replay has shown it already
      for (const stored of stretch.get(worker) || []) {
        if (!before(stored, first.p)) return true; // the history reached it
        if (newestBefore === null || before(newestBefore, stored)) newestBefore = stored;
      }
      // The history holds the position right before it.
      return newestBefore !== null && newestBefore.seq + 1 === first.p.seq;
    }

    async function readStretch(mine, from) {
      const positions = [];
      let after = null;
      const until = host.serverNow() + FUTURE_SLACK_MS;
      do {
        const document = await withRetries(
          mine, () => host.fetchJson(windowPath(from, until, after)));
        if (mine !== generation) return null;
        for (const stored of document.positions) positions.push(stored);
        after = document.next;
      } while (after !== null);
      return positions;
    }

    function startJoin(from) {
      phase = "waiting";
      joinFrom = from;
      waitStarted = performance.now();
      pollJoin(generation).catch(() => {});
    }

    async function pollJoin(mine) {
      for (;;) {
        const positions = await readStretch(mine, joinFrom);
        if (positions === null || mine !== generation) return;
        const byWorker = new Map();
        for (const stored of positions) {
          if (!byWorker.has(stored.worker)) byWorker.set(stored.worker, []);
          byWorker.get(stored.worker).push(stored);
        }
        const firsts = firstLivePositions();
        let uncovered = 0;
        for (const [worker, first] of firsts) {
          if (!covered(worker, first, byWorker)) uncovered += 1;
        }
        const waited = performance.now() - waitStarted;
        if (uncovered > 0 && waited < JOIN_WAIT_MS) {
          stats.seamPolls += 1;
          await sleep(JOIN_POLL_MS);
          if (mine !== generation) return;
          continue;
        }
        stats.seamWaitMs = Math.round(waited);
        stats.seamUncovered = uncovered;
        if (uncovered > 0) {
          host.notice(`The history is behind the live stream: ${uncovered} worker(s) joined ` +
            "live with positions missing from the replay (marked as skipped).");
        }
        joinHistory = positions.filter((stored) => {
          const first = firsts.get(stored.worker);
          if (first && !before(stored, first.p)) return false; // the live side has it
          return !alreadyShown(stored, host.lastPosition(stored.worker));
        });
        joinIndex = 0;
        ringIndex = 0;
        phase = "seam";
        return;
      }
    }

    function playSeam(limit) {
      for (;;) {
        const stored = joinHistory[joinIndex];
        const live = ring[ringIndex];
        if (stored === undefined && live === undefined) return;
        const storedAt = stored ? stored.ts : Infinity;
        const liveAt = live ? live.t : Infinity;
        if (Math.min(storedAt, liveAt) > limit) return;
        if (storedAt <= liveAt) {
          joinIndex += 1;
          host.applyPosition(stored.worker, payloadOf(stored), stored.ts, true);
          stats.played += 1;
        } else {
          ringIndex += 1;
          if (live.k === "s") {
            host.applyStatus(live.w, live.p, live.rx);
          } else if (alreadyShown(live.p, host.lastPosition(live.w))) {
            stats.seamOverlap += 1;
          } else {
            host.applyPosition(live.w, live.p, live.rx, live.continuous);
          }
        }
      }
    }

    function finish() {
      playSeam(Infinity);
      for (const [worker, presence] of statuses) {
        host.applyStatus(worker, presence.status, presence.ms);
      }
      stats.joins += 1;
      stop();
      host.changed();
      host.finished();
    }

    // --- The clock ------------------------------------------------------------------------
    function tick() {
      const wall = performance.now();
      if (playing) head += (wall - lastWall) * speed;
      lastWall = wall;
      const now = host.serverNow();
      if (phase === "history") {
        head = Math.min(head, readUntil(), now);
        playHistory(head);
        if (queue.length - queueIndex < REFILL_BELOW) fetchPage();
        if (windowRead && queueIndex >= queue.length && head >= windowUntil) {
          openWindow(windowUntil);
        }
      } else if (phase === "waiting") {
        head = Math.min(head, joinFrom);
      } else if (phase === "seam") {
        if (head >= now) {
          finish();
          return;
        }
        playSeam(head);
      }
      host.changed();
      host.progress();
    }

    function stop() {
      generation += 1;
      if (timer !== null) window.clearInterval(timer);
      timer = null;
      phase = "idle";
      playing = false;
      queue = [];
      queueIndex = 0;
      ring = [];
      ringIndex = 0;
      joinHistory = [];
      dropped.clear();
      statuses.clear();
    }

    return {
      SPEEDS: SPEEDS,
      active() {
        return phase !== "idle";
      },
      // From `sinceMs` (a fix time); again while replaying to seek: the view starts over, the
      // live side keeps what it holds.
      start(sinceMs) {
        if (phase === "idle") seed(host.liveWorkers());
        generation += 1;
        since = Math.min(sinceMs, host.serverNow());
        head = since;
        queue = [];
        queueIndex = 0;
        presence = [];
        presenceIndex = 0;
        seekToData = true;
        stats.seekedTo = null;
        joinHistory = [];
        ringIndex = 0;
        fetching = null;
        phase = "history";
        playing = true;
        lastWall = performance.now();
        host.begin();
        openWindow(since);
        if (timer === null) timer = window.setInterval(tick, TICK_MS);
      },
      play() {
        lastWall = performance.now();
        playing = phase !== "idle";
      },
      pause() {
        playing = false;
      },
      setSpeed(value) {
        if (SPEEDS.includes(value)) speed = value;
      },
      // Leave without joining (the Live button): the map takes a fresh snapshot instead.
      leave() {
        stop();
      },
      liveEvents: liveEvents,
      liveSnapshot: liveSnapshot,
      now() {
        return head;
      },
      state() {
        return Object.assign({
          phase: phase,
          playing: playing,
          speed: speed,
          since: since,
          head: Math.round(head),
          queued: queue.length - queueIndex,
          ring: ring.length,
        }, stats);
      },
    };
  }

  return { createPlayer: createPlayer, SPEEDS: SPEEDS };
})();
