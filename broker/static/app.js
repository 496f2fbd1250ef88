// tokentee live console: plain JavaScript, no build step.  Every request goes to the broker's
// public HTTP API, relative to this page, so the console also works behind a path prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TERMINAL = ["done", "error", "cancelled"];
  const HISTORY = 60; // points kept in the broker charts (one per second)
  const TOKEN_KEY = "tokentee.token";

  // --- access token ----------------------------------------------------------------------

  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
  // Set by a 401/403: the pollers then wait for a token instead of asking every second.
  let refused = false;

  // EventSource cannot send an Authorization header: with a bearer token set, event streams
  // are opened with a read token for their generation (?token=), which the API mints.
  const readTokens = new Map(); // generation -> { token, until (ms) }

  function keepReadToken(gid, value, expiresIn) {
    if (value) readTokens.set(gid, { token: value, until: Date.now() + expiresIn * 1000 });
  }

  async function streamUrl(gid, path) {
    if (!token()) return path;
    let kept = readTokens.get(gid);
    if (!kept || kept.until - Date.now() < 30000) {
      const minted = await api("v1/streams/" + encodeURIComponent(gid) + "/read-token", { method: "POST" });
      keepReadToken(gid, minted.token, minted.expires_in);
      kept = readTokens.get(gid);
    }
    return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(kept.token);
  }

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (token()) headers.Authorization = "Bearer " + token();
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (response.status === 401 || response.status === 403) {
      refused = true;
      notice("The server refused the request (" + response.status + "): enter an access token above.");
      throw new ApiError(response.status, "unauthorized");
    }
    const body = response.status === 204 ? null : await response.json();
    if (!response.ok) {
      throw new ApiError(response.status, describe(body));
    }
    return body;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function describe(body) {
    if (!body || body.detail === undefined) return "request failed";
    if (typeof body.detail === "string") return body.detail;
    return body.detail.map((d) => d.msg).join("; ");
  }

  function notice(text) {
    $("notice").textContent = text;
  }

  // --- charts ------------------------------------------------------------------------------

  const COLORS = ["#0b5cad", "#c0392b", "#17663a", "#8e44ad", "#d35400", "#2c3e50"];

  class Chart {
    constructor(el, labels, { xTime = true } = {}) {
      this.el = el;
      this.labels = labels;
      this.xTime = xTime;
      this.data = [[], ...labels.map(() => [])];
      this.plot = null;
      if (window.uPlot) this.build();
    }

    build() {
      if (this.plot) this.plot.destroy();
      const opts = {
        width: Math.max(200, this.el.clientWidth || 300),
        height: 150,
        legend: { show: true, live: false },
        cursor: { show: false },
        scales: { x: { time: this.xTime } },
        series: [{}, ...this.labels.map((label, i) => ({
          label, stroke: COLORS[i % COLORS.length], width: 2, points: { show: false },
        }))],
        axes: [{ size: 30 }, { size: 45 }],
      };
      this.plot = new window.uPlot(opts, this.data, this.el);
    }

    setLabels(labels) {
      if (labels.join("\n") === this.labels.join("\n")) return;
      this.labels = labels;
      this.data = [this.data[0], ...labels.map(() => this.data[0].map(() => null))];
      if (window.uPlot) this.build();
    }

    push(x, values, keep = HISTORY) {
      this.data[0].push(x);
      values.forEach((v, i) => this.data[i + 1].push(v));
      if (this.data[0].length > keep) this.data.forEach((s) => s.shift());
      if (this.plot) this.plot.setData(this.data);
    }

    reset() {
      this.data = [[], ...this.labels.map(() => [])];
      if (this.plot) this.plot.setData(this.data);
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: Math.max(200, this.el.clientWidth), height: 150 });
    }
  }

  // --- reader panes -----------------------------------------------------------------------

  class Pane {
    constructor(gen, name, late) {
      this.gen = gen;
      this.name = name;
      this.lastId = 0;
      this.text = "";
      this.source = null;
      this.paused = false;
      this.held = [];
      this.finished = false;
      this.resumedFrom = null;
      this.shownId = 0;
      this.onToken = null;
      const node = $("pane-template").content.firstElementChild.cloneNode(true);
      node.dataset.reader = name;
      node.setAttribute("aria-label", "Reader " + name);
      node.querySelector(".pane-title").textContent = "Reader " + name;
      this.node = node;
      this.textEl = node.querySelector(".pane-text");
      this.textEl.setAttribute("aria-label", "Text received by reader " + name);
      this.statusEl = node.querySelector(".pane-status");
      this.pauseButton = node.querySelector(".pause");
      this.dropButton = node.querySelector(".drop");
      this.pauseButton.addEventListener("click", () => this.togglePause());
      this.dropButton.addEventListener("click", () => this.toggleDrop());
      $("panes").appendChild(node);
      this.status(late ? "joined late: replaying from the start" : "reading from the start");
      this.connect(0).catch(ignoreApiError);
    }

    status(text) {
      this.statusEl.textContent = text;
    }

    async connect(after) {
      const path = "v1/streams/" + encodeURIComponent(this.gen) + "/events" + (after ? "?after=" + after : "");
      let url;
      try {
        url = await streamUrl(this.gen, path);
      } catch (err) {
        if (!(err instanceof ApiError)) throw err;
        this.status("could not open the stream: " + err.message);
        return;
      }
      if (this.closed) return;
      const source = new EventSource(url);
      this.source = source;
      this.node.dataset.state = "reading";
      const handle = (e) => this.receive(e);
      ["token", "reasoning", "gap", "snapshot", "done", "cancelled"].forEach((t) => source.addEventListener(t, handle));
      source.addEventListener("error", (e) => {
        if (e instanceof MessageEvent && e.data !== undefined) {
          handle(e); // the generation's own error event
        } else if (source.readyState === EventSource.CONNECTING) {
          this.status("connection lost: the browser reconnects from id " + this.lastId);
        } else if (!this.finished && source === this.source) {
          this.status("connection closed at id " + this.lastId);
        }
      });
    }

    receive(e) {
      const id = Number(e.lastEventId);
      if (Number.isFinite(id) && id > 0) this.lastId = id;
      const event = { type: e.type, data: JSON.parse(e.data), id };
      if (TERMINAL.includes(event.type)) {
        this.finished = true;
        e.target.close(); // the stream that delivered it, whatever this.source is now
      }
      if (this.paused) {
        this.held.push(event);
        this.status("paused at id " + this.shownId + ", " + this.held.length + " events held");
        return;
      }
      this.apply(event);
    }

    apply(event) {
      this.shownId = event.id;
      if (event.type === "token" || event.type === "snapshot") {
        this.text += event.data.text || "";
        this.textEl.textContent = this.text;
        this.textEl.scrollTop = this.textEl.scrollHeight;
        if (this.onToken && event.type === "token") this.onToken();
      } else if (event.type === "gap") {
        this.text += " [… entries " + event.data.first_missing + "–" + event.data.last_missing + " no longer kept …] ";
        this.textEl.textContent = this.text;
      }
      if (TERMINAL.includes(event.type)) {
        const why = event.data.code || event.data.reason || event.data.finish_reason || "";
        let line = "finished: " + event.type + (why ? " (" + why + ")" : "") + " at id " + event.id;
        if (this.resumedFrom !== null) line += "; resumed from id " + this.resumedFrom + ", nothing missing";
        this.status(line);
        this.node.dataset.state = "finished";
        this.pauseButton.disabled = true;
        this.dropButton.disabled = true;
        if (this.gen === current.id) generationEnded(event.type);
      } else if (this.resumedFrom !== null) {
        this.status("resumed from id " + this.resumedFrom + ", now at id " + event.id);
      } else {
        this.status("reading, at id " + event.id);
      }
    }

    togglePause() {
      this.paused = !this.paused;
      this.pauseButton.textContent = this.paused ? "Continue" : "Pause";
      if (this.paused) {
        this.status("paused at id " + (this.shownId || 0) + ": events are held, the connection stays open");
        return;
      }
      const held = this.held;
      this.held = [];
      held.forEach((event) => this.apply(event));
    }

    toggleDrop() {
      if (this.source && this.source.readyState !== EventSource.CLOSED) {
        this.source.close();
        this.source = null;
        this.node.dataset.state = "dropped";
        this.dropButton.textContent = "Resume";
        this.pauseButton.disabled = true;
        this.status("dropped at id " + this.lastId);
      } else if (!this.finished) {
        this.resumedFrom = this.lastId;
        this.dropButton.textContent = "Drop";
        this.pauseButton.disabled = false;
        this.connect(this.lastId).catch(ignoreApiError);
        this.status("resumed from id " + this.lastId);
      }
    }

    close() {
      this.closed = true;
      if (this.source) this.source.close();
      this.node.remove();
    }
  }

  // --- the generation being watched ---------------------------------------------------------

  const current = { id: null, panes: [], sentences: null, statsTimer: null, lastArrival: null, gaps: 0 };
  let gapChart = null;
  // The sentences pane's state: its count, whether the logger's `end` came, and whether the
  // broker figures (polled every second) report a live sentence logger.  Without one the
  // pane says so instead of waiting silently; the stream stays open and catches up the
  // moment a logger starts.
  const sentenceState = { count: 0, ended: false, loggerUp: null, problem: null };

  function showSentenceStatus() {
    const { count, ended, loggerUp, problem } = sentenceState;
    let text;
    if (problem) text = "Could not open the sentences: " + problem;
    else if (ended) text = "All " + count + " sentences logged.";
    else if (loggerUp === false) {
      text = "No sentence logger is running: its sentences appear here once one starts"
        + " (tokentee consume sentences)." + (count ? " " + count + " so far." : "");
    } else text = count ? count + " sentences so far" : "Waiting for the sentence logger…";
    $("sent-status").textContent = text;
  }

  function watch(gid) {
    current.panes.forEach((p) => p.close());
    if (current.sentences) current.sentences.close();
    clearTimeout(current.statsTimer);
    current.id = gid;
    current.panes = [];
    current.lastArrival = null;
    current.gaps = 0;
    $("gen-id").textContent = gid;
    $("gen-status").textContent = "running";
    $("cancel-button").disabled = false;
    $("add-reader").disabled = false;
    $("sentence-list").replaceChildren();
    ["st-tokens", "st-ttft", "st-rate", "st-gaps", "st-complete"].forEach((id) => { $(id).textContent = "–"; });
    if (gapChart) gapChart.reset();
    addPane(false);
    addPane(false);
    followSentences(gid).catch(ignoreApiError);
    pollStats(gid);
  }

  function addPane(late) {
    const name = String.fromCharCode(65 + current.panes.length);
    const pane = new Pane(current.id, name, late);
    if (current.panes.length === 0) pane.onToken = tokenArrived;
    current.panes.push(pane);
  }

  function tokenArrived() {
    const now = performance.now();
    if (current.lastArrival !== null && gapChart) {
      current.gaps += 1;
      gapChart.push(current.gaps, [Math.round((now - current.lastArrival) * 10) / 10], 500);
    }
    current.lastArrival = now;
  }

  function generationEnded(type) {
    if ($("gen-status").textContent === type) return; // each pane reports the end
    $("gen-status").textContent = type;
    $("cancel-button").disabled = true;
    refreshRecent();
  }

  async function followSentences(gid) {
    sentenceState.count = 0;
    sentenceState.ended = false;
    sentenceState.problem = null;
    showSentenceStatus();
    let url;
    try {
      url = await streamUrl(gid, "v1/streams/" + encodeURIComponent(gid) + "/sentences/events");
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      if (gid !== current.id) return;
      sentenceState.problem = err.message;
      showSentenceStatus();
      return;
    }
    if (gid !== current.id) return;
    const source = new EventSource(url);
    current.sentences = source;
    source.addEventListener("sentence", (e) => {
      const record = JSON.parse(e.data);
      const li = document.createElement("li");
      li.textContent = record.text;
      li.value = record.index;
      $("sentence-list").appendChild(li);
      sentenceState.count = record.index;
      showSentenceStatus();
    });
    source.addEventListener("end", () => {
      source.close();
      sentenceState.ended = true;
      showSentenceStatus();
    });
  }

  function ms(value) {
    return value === null || value === undefined ? "–" : Math.round(value) + " ms";
  }

  async function pollStats(gid) {
    if (gid !== current.id) return;
    let complete = false;
    if (!refused) {
      try {
        const s = await api("v1/streams/" + encodeURIComponent(gid) + "/stats");
        if (gid !== current.id) return;
        $("st-tokens").textContent = s.tokens;
        $("st-ttft").textContent = ms(s.time_to_first_token_ms);
        $("st-rate").textContent = s.tokens_per_second === null ? "–" : s.tokens_per_second.toFixed(1);
        const g = s.inter_token_gap_ms;
        $("st-gaps").textContent = g.count ? [g.p50, g.p95, g.max].map((v) => Math.round(v)).join(" / ") + " ms" : "–";
        $("st-complete").textContent = s.complete ? "complete" : "at id " + s.processed_seq;
        complete = s.complete;
      } catch (err) {
        ignoreApiError(err);
      }
    }
    if (!complete) current.statsTimer = setTimeout(() => pollStats(gid), 1000);
  }

  // --- starting and cancelling --------------------------------------------------------------

  let providers = [];

  async function loadConfig() {
    const config = await api("v1/console/config");
    providers = config.providers;
    const select = $("provider");
    select.replaceChildren(...providers.map((p) => {
      const option = document.createElement("option");
      option.value = p.name;
      option.textContent = p.name + (p.ready ? "" : " (not configured)");
      option.disabled = !p.ready;
      return option;
    }));
    select.value = config.default_provider;
    if (select.selectedOptions.length === 0 || select.selectedOptions[0].disabled) select.value = "simulated";
    providerChanged();
  }

  function providerChanged() {
    const p = providers.find((x) => x.name === $("provider").value);
    $("model").placeholder = p ? p.model : "default";
    const simulated = $("provider").value === "simulated";
    $("pace-field").hidden = !simulated;
    $("provider-problem").textContent = p && p.problem ? p.problem : "";
  }

  async function start(event) {
    event.preventDefault();
    const provider = $("provider").value;
    const params = {};
    const maxTokens = Number($("max-tokens").value);
    if (maxTokens > 0) params.max_tokens = maxTokens;
    if (provider === "simulated") params.tokens_per_second = Number($("pace").value);
    const body = { prompt: $("prompt").value, provider, params };
    if ($("model").value.trim()) body.model = $("model").value.trim();
    const unreadAfter = $("unread-after").value.trim();
    if (unreadAfter) body.cancel_unread_after = Number(unreadAfter);
    $("start-button").disabled = true;
    try {
      const created = await api("v1/streams", { method: "POST", body: JSON.stringify(body) });
      keepReadToken(created.id, created.read_token, created.read_token_expires_in || 0);
      notice("");
      watch(created.id);
      refreshRecent();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      if (err.status !== 401 && err.status !== 403) notice("Could not start: " + err.message);
    } finally {
      $("start-button").disabled = false;
    }
  }

  async function cancel() {
    if (!current.id) return;
    $("cancel-button").disabled = true;
    try {
      const gid = current.id;
      const result = await api("v1/streams/" + encodeURIComponent(gid) + "/cancel", { method: "POST" });
      // The readers may have seen the terminal event before this answer came back.
      if (gid === current.id && $("gen-status").textContent === "running") {
        $("gen-status").textContent = result.status === "running" ? "cancelling" : result.status;
      }
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      notice("Could not cancel: " + err.message);
    }
  }

  // --- broker figures and recent generations -------------------------------------------------

  let loadChart = null;
  let rateChart = null;
  let lagChart = null;

  async function pollFigures() {
    if (refused) {
      setTimeout(pollFigures, 1000);
      return;
    }
    try {
      const f = await api("v1/console/figures");
      // The figures are the whole deployment's, whichever replica answered; the list says
      // what each process contributes.
      $("fg-replicas").textContent = f.replicas.length;
      $("replica-list").replaceChildren(...f.replicas.map((r) => {
        const li = document.createElement("li");
        li.textContent = r.host + " (pid " + r.pid + "): " + r.active_generations + " running, "
          + r.sse_clients + " SSE clients, " + r.tokens_in_per_second + " in/s, "
          + r.tokens_out_per_second + " out/s" + (r.replica === f.replica ? " (answered this poll)" : "");
        return li;
      }));
      $("fg-active").textContent = f.active_generations;
      $("fg-sse").textContent = f.sse_clients;
      $("fg-in").textContent = f.tokens_in_per_second;
      $("fg-out").textContent = f.tokens_out_per_second;
      $("fg-fanout").textContent = f.fanout_ratio.toFixed(2) + "×";
      const types = Object.keys(f.consumers).sort();
      const loggerUp = Boolean(f.consumers.sentences && f.consumers.sentences.up);
      if (loggerUp !== sentenceState.loggerUp) {
        sentenceState.loggerUp = loggerUp;
        if (current.id !== null) showSentenceStatus();
      }
      $("fg-lag").textContent = types.length
        ? types.map((t) => t + " " + (f.consumers[t].lag || 0)).join(", ")
        : "no consumers";
      const x = Math.round(f.time);
      if (loadChart) {
        loadChart.push(x, [f.active_generations, f.sse_clients]);
        rateChart.push(x, [f.tokens_in_per_second, f.tokens_out_per_second]);
        lagChart.setLabels(types.length ? types : ["(none)"]);
        lagChart.push(x, types.length ? types.map((t) => f.consumers[t].lag || 0) : [0]);
      }
    } catch (err) {
      ignoreApiError(err);
    }
    setTimeout(pollFigures, 1000);
  }

  function time(unix) {
    return new Date(unix * 1000).toLocaleTimeString();
  }

  async function refreshRecent() {
    try {
      const { generations } = await api("v1/console/generations?limit=15");
      $("recent-body").replaceChildren(...generations.map((g) => {
        const tr = document.createElement("tr");
        const idCell = document.createElement("td");
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = g.id;
        button.setAttribute("aria-label", "Watch generation " + g.id);
        button.addEventListener("click", () => watch(g.id));
        idCell.appendChild(button);
        const cells = [g.status, g.provider + " / " + g.model, time(g.created), String(g.last_event_id)]
          .map((text) => {
            const td = document.createElement("td");
            td.textContent = text;
            return td;
          });
        cells[0].className = "status-" + g.status;
        tr.append(idCell, ...cells);
        return tr;
      }));
    } catch (err) {
      ignoreApiError(err);
    }
  }

  async function pollRecent() {
    if (!refused) await refreshRecent();
    setTimeout(pollRecent, 2000);
  }

  // --- wiring ------------------------------------------------------------------------------------

  function init() {
    $("token").value = token();
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      readTokens.clear();
      refused = false;
      notice("");
      loadConfig().catch(ignoreApiError);
    });
    $("pace").addEventListener("input", () => { $("pace-out").textContent = $("pace").value; });
    $("provider").addEventListener("change", providerChanged);
    $("start-form").addEventListener("submit", start);
    $("cancel-button").addEventListener("click", cancel);
    $("add-reader").addEventListener("click", () => addPane(true));
    gapChart = new Chart($("gap-chart"), ["gap ms"], { xTime: false });
    loadChart = new Chart($("load-chart"), ["generations", "SSE clients"]);
    rateChart = new Chart($("rate-chart"), ["tokens in/s", "tokens out/s"]);
    lagChart = new Chart($("lag-chart"), ["(none)"]);
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => [gapChart, loadChart, rateChart, lagChart].forEach((c) => c.resize()), 150);
    });
    loadConfig().catch(ignoreApiError);
    pollFigures();
    pollRecent();
    document.body.dataset.ready = "true";
  }

  // An error answer (already reported on the page) or a failed fetch (the server is away:
  // the next poll tries again); anything else is a bug and is thrown on.
  function ignoreApiError(err) {
    if (!(err instanceof ApiError) && !(err instanceof TypeError)) throw err;
  }

  // Exposed for tests and for poking at from the devtools.
  window.tokentee = { watch, current };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
