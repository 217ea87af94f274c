// The replay's bar for app.js: the range and start, play/pause, speed, the scrubber, and the
// team's alerts as marks on the time bar. Plain script, no build step; replay.js plays.
// Data is only ever written as text (textContent, title, aria-label), never as HTML.
"use strict";

window.TeamtrackReplayBar = (function () {
  function create(host) {
    // host: { controls, team(), serverNow(), fetchJson(path), clockTime(ms), formatDuration(ms),
    //         reloadLive(), createPlayer() }
    const controls = host.controls;
    let player = null;
    let replayRangeStart = 0; // the scrubber's left end
    let scrubbing = false;

    function showReplayControls(on) {
      document.body.dataset.mode = on ? "replay" : "live";
      controls.bar.hidden = !on;
      controls.toggle.setAttribute("aria-pressed", String(on));
      if (on) showReplayProgress();
    }

    function chosenStart() {
      if (controls.range.value === "custom") {
        const chosen = new Date(controls.start.value).getTime();
        return Number.isFinite(chosen) ? chosen : null;
      }
      return host.serverNow() - Number(controls.range.value);
    }

    function startReplay() {
      const since = chosenStart();
      if (since === null) return;
      replayRangeStart = since;
      player.setSpeed(Number(controls.speed.value));
      player.start(since);
      showReplayAlerts(since);
    }

    // The team's alerts of the replayed window as marks on the time bar (the alerts API of
    // docs/protocol.md; a dashboard without it answers 404 and the bar stays plain). Each mark
    // names the alert in its title (plain text) and seeks the replay there when clicked.
    let replayAlertsAsked = 0;
    async function showReplayAlerts(since) {
      const marks = controls.alerts;
      marks.replaceChildren();
      const asked = ++replayAlertsAsked;
      let answer;
      try {
        answer = await host.fetchJson(`/api/teams/${encodeURIComponent(host.team())}/alerts` +
          `?since=${Math.floor(since)}&limit=500`);
      } catch (error) {
        return; // 404 (no alerts service) or unreachable: no marks
      }
      if (asked !== replayAlertsAsked || !answer || !Array.isArray(answer.alerts)) return;
      const end = host.serverNow();
      for (const alert of answer.alerts) {
        if (typeof alert.at !== "number" || alert.at < since || alert.at > end) continue;
        const mark = document.createElement("button");
        mark.type = "button";
        mark.className = "alert-tick";
        mark.style.left = ((alert.at - since) / (end - since)) * 100 + "%";
        const text = host.clockTime(alert.at) + " " + String(alert.worker || "") + ": " +
          String(alert.detail || alert.kind || "alert");
        mark.title = text;
        mark.setAttribute("aria-label", "Alert at " + text);
        mark.addEventListener("click", () => player.start(Math.max(since, alert.at - 5000)));
        marks.appendChild(mark);
      }
    }

    // The Live button: leave the replay where it is; a fresh snapshot replaces the view.
    function leaveReplay() {
      player.leave();
      showReplayControls(false);
      host.reloadLive();
    }

    function showReplayProgress() {
      const state = player.state();
      const now = host.serverNow();
      controls.play.textContent = state.playing ? "Pause" : "Play";
      if (!scrubbing) {
        controls.scrubber.min = String(Math.floor(replayRangeStart));
        controls.scrubber.max = String(Math.ceil(now));
        controls.scrubber.value = String(state.head);
      }
      const shown = scrubbing ? Number(controls.scrubber.value) : state.head;
      const behind = now - shown;
      let text = new Date(shown).toLocaleTimeString([], { hour12: false });
      if (state.phase === "waiting") text += " · joining live: waiting for the history";
      else if (state.phase === "seam") text += " · joining live";
      else text += " · " + host.formatDuration(behind) + " ago";
      controls.clock.textContent = text;
    }

    // The player (replay.js), or null when this dashboard has no history or the script is
    // missing (the Replay button then says why).
    function setUp(history) {
      if (!history || !window.TeamtrackReplay) {
        controls.toggle.disabled = true;
        controls.toggle.title = history
          ? "The replay script did not load."
          : "This dashboard has no history database (--database-url).";
        return null;
      }
      player = host.createPlayer();
      controls.toggle.addEventListener("click", () => {
        if (player.active()) leaveReplay();
        else startReplay();
      });
      controls.live.addEventListener("click", leaveReplay);
      controls.play.addEventListener("click", () => {
        if (player.state().playing) player.pause();
        else player.play();
        showReplayProgress();
      });
      controls.speed.addEventListener("change", () => {
        player.setSpeed(Number(controls.speed.value));
      });
      controls.range.addEventListener("change", () => {
        const custom = controls.range.value === "custom";
        controls.start.hidden = !custom;
        if (custom && !controls.start.value) {
          const hourAgo = new Date(host.serverNow() - 3600000);
          hourAgo.setMinutes(hourAgo.getMinutes() - hourAgo.getTimezoneOffset());
          controls.start.value = hourAgo.toISOString().slice(0, 19);
        }
        startReplay();
      });
      controls.start.addEventListener("change", startReplay);
      controls.scrubber.addEventListener("input", () => {
        scrubbing = true;
        showReplayProgress();
      });
      controls.scrubber.addEventListener("change", () => {
        scrubbing = false;
        player.start(Number(controls.scrubber.value));
      });
      return player;
    }

    return { setUp: setUp, showControls: showReplayControls, showProgress: showReplayProgress };
  }

  return { create: create };
})();
