// comfy-relay browser client: one ES module, no dependencies.
//
//   import { RelayClient } from "/static/relay-client.js";
//   const relay = new RelayClient({ clientId: "alice", lang: "en" });
//   relay.on("prompt", ({ prompt }) => render(prompt));
//   relay.connect();
//   const { prompt_id } = await relay.submitWorkflow("portrait_mode", { seed: 7 });
//
// The client keeps one WebSocket to the relay's /ws, reconnects with backoff, resumes with
// `since`/`epoch` so no event is lost, and folds the relay's events into one state object per
// prompt (steps, percent, ETA, preview, outputs, final status). When the relay cannot replay
// what was missed (it restarted), it rebuilds from the relay's snapshot and, for prompts the
// relay no longer knows, from ComfyUI's history. docs/client.md describes it all.

const FILE_KEYS = ["images", "gifs", "video", "videos", "audio", "files", "meshes", "3d"];

function randomId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function uuid4() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The files in a prompt's outputs (node id -> UI output), each with its /view path. */
export function outputFiles(outputs) {
  const files = [];
  for (const [node, output] of Object.entries(outputs || {})) {
    if (!output || typeof output !== "object") continue;
    for (const kind of FILE_KEYS) {
      for (const entry of Array.isArray(output[kind]) ? output[kind] : []) {
        if (!entry || typeof entry.filename !== "string") continue;
        const ref = { filename: entry.filename, subfolder: entry.subfolder || "", type: entry.type || "output" };
        files.push({ ...ref, node, kind, url: "/view?" + new URLSearchParams(ref).toString() });
      }
    }
  }
  return files;
}

/** A relay error answer, thrown by the HTTP helpers: `status`, `type` and the relay's message. */
export class RelayError extends Error {
  constructor(status, type, message, body) {
    super(message);
    this.name = "RelayError";
    this.status = status;
    this.type = type;
    this.body = body;
  }
}

/** One prompt's state, folded from its events. Read it; the client changes it. */
class PromptState {
  constructor(id) {
    this.id = id;
    this.workflow = null;
    this.phase = "submitted"; // submitted, queued, running, done
    this.status = null; // success, error, interrupted, cancelled once done
    this.number = null;
    this.total = null;
    this.completed = 0;
    this.percent = 0;
    this.elapsed = 0;
    this.eta = null;
    this.queuedFor = null;
    this.steps = []; // [{node, classType, name, index, state, duration}] in expected run order
    this.current = null; // node id of the running step
    this.progress = null; // {value, max} of the running step
    this.preview = null; // URL of the latest live preview
    this.files = []; // [{filename, subfolder, type, kind, node, url, stored}]
    // Storage, when its files go to the bucket: {state: "storing" | "stored" | "partial" |
    // "failed", bucket, files: [{node, filename, kind, key, state, url, expires, size, error}]};
    // each entry of `files` that is stored also has it as `stored`.
    this.storage = null;
    this.error = null;
    this.recovered = false;
    this.detached = false; // its progress can no longer be followed; only its end will come
    this.inFlight = false;
    this.updatedAt = Date.now();
  }

  get done() {
    return this.phase === "done";
  }

  step(node) {
    let found = this.steps.find((s) => s.node === String(node));
    if (!found) {
      found = { node: String(node), classType: null, name: String(node), index: null, state: "pending", duration: null };
      this.steps.push(found);
    }
    return found;
  }

  get currentStep() {
    return this.current == null ? null : this.steps.find((s) => s.node === this.current) || null;
  }
}

export class RelayClient {
  /**
   * @param {object} options
   * @param {string} [options.baseUrl] the relay's URL (default: this page's origin)
   * @param {string} [options.clientId] all tabs with one id share events (default: a new id)
   * @param {string} [options.lang] step names in "ko" or "en" (default: the relay's)
   * @param {string} [options.token] a token for a relay that requires one
   * @param {number} [options.reconnectInitial] first reconnect delay in ms (500)
   * @param {number} [options.reconnectMax] longest reconnect delay in ms (10000)
   */
  constructor(options = {}) {
    const origin = typeof location !== "undefined" ? location.origin : "http://127.0.0.1:8190";
    this.baseUrl = (options.baseUrl || origin).replace(/\/$/, "");
    this.clientId = options.clientId || randomId();
    this.lang = options.lang || null;
    this.token = options.token || null;
    this.reconnectInitial = options.reconnectInitial ?? 500;
    this.reconnectMax = options.reconnectMax ?? 10000;
    this.state = "idle"; // idle, connecting, connected, reconnecting, closed
    this.upstream = null; // the relay's own link to ComfyUI: connecting, connected, down
    this.queueRemaining = null;
    this.prompts = new Map();
    this.lastSeq = null;
    this.epoch = null;
    this._listeners = new Map();
    this._socket = null;
    this._attempt = 0;
    this._timer = null;
    this._wanted = false;
    this._everConnected = false;
  }

  // Events ---------------------------------------------------------------------------------

  /**
   * Subscribe to "state" (connection), "upstream", "queue", "prompt" (a prompt's state
   * changed), "done" (a prompt ended), "event" (every relay event, raw). Returns an
   * unsubscribe function.
   */
  on(type, handler) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(handler);
    return () => this._listeners.get(type)?.delete(handler);
  }

  _emit(type, detail) {
    for (const handler of this._listeners.get(type) || []) {
      try {
        handler(detail);
      } catch (error) {
        console.error("comfy-relay listener failed", error);
      }
    }
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  // Connection -----------------------------------------------------------------------------

  /** Open the socket (and keep it open until close()). */
  connect() {
    this._wanted = true;
    if (this._socket) return;
    this._open();
  }

  /** Close the socket for good. */
  close() {
    this._wanted = false;
    clearTimeout(this._timer);
    if (this._socket) this._socket.close(1000);
    this._socket = null;
    this._setState("closed");
  }

  _wsUrl() {
    const url = new URL(this.baseUrl + "/ws");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("clientId", this.clientId);
    if (this.lang) url.searchParams.set("lang", this.lang);
    if (this.lastSeq != null && this.epoch) {
      url.searchParams.set("since", String(this.lastSeq));
      url.searchParams.set("epoch", this.epoch);
    }
    return url.toString();
  }

  _open() {
    this._setState(this._everConnected ? "reconnecting" : "connecting", { attempt: this._attempt });
    let socket;
    try {
      // The token rides as a subprotocol, which keeps it out of URLs and access logs; the relay
      // selects "comfy-relay" in answer.
      const protocols = this.token ? ["comfy-relay", `comfy-relay.token.${this.token}`] : undefined;
      socket = new WebSocket(this._wsUrl(), protocols);
    } catch (error) {
      this._retry();
      return;
    }
    this._socket = socket;
    socket.onmessage = (message) => {
      if (typeof message.data !== "string") return;
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      this._receive(event);
    };
    socket.onclose = (close) => {
      if (this._socket !== socket) return;
      this._socket = null;
      if (!this._wanted) return;
      if (close.code === 4400 || close.code === 4401 || close.code === 4403) {
        // Refused for good (bad parameters or not allowed): retrying would not help.
        this._setState("closed", { code: close.code, reason: close.reason });
        return;
      }
      this._retry();
    };
  }

  _retry() {
    if (!this._wanted) return;
    const delay = Math.min(this.reconnectMax, this.reconnectInitial * 2 ** this._attempt);
    this._attempt += 1;
    this._setState("reconnecting", { attempt: this._attempt, delay });
    clearTimeout(this._timer);
    // Jitter spreads a relay restart's reconnects.
    this._timer = setTimeout(() => this._open(), delay * (0.75 + Math.random() * 0.5));
  }

  // Incoming events ------------------------------------------------------------------------

  _receive(event) {
    if (typeof event.seq === "number" && (this.lastSeq == null || event.seq > this.lastSeq)) {
      this.lastSeq = event.seq;
    }
    this._emit("event", event);
    switch (event.type) {
      case "relay.hello":
        this._hello(event);
        return;
      case "relay.upstream":
        this.upstream = event.state;
        this._emit("upstream", { state: event.state, attempt: event.attempt, reason: event.reason });
        return;
      case "relay.queue":
        this.queueRemaining = event.remaining;
        this._emit("queue", { remaining: event.remaining });
        return;
      default:
        if (event.prompt_id) this._promptEvent(event);
    }
  }

  _hello(hello) {
    const resumed = Boolean(hello.resumed);
    const wasConnected = this._everConnected;
    this.epoch = hello.epoch;
    this._attempt = 0;
    this._everConnected = true;
    this.upstream = hello.upstream;
    this._setState("connected", { resumed, reconnected: wasConnected, missed: hello.missed });
    this._emit("upstream", { state: hello.upstream });
    if (!resumed) {
      // The relay could not replay a gap (or this is a fresh page): snapshots follow at once for
      // the prompts it still has; any other unfinished prompt is settled from ComfyUI's history.
      const snapshotted = new Set();
      this._snapshotted = snapshotted;
      clearTimeout(this._snapshotTimer);
      this._snapshotTimer = setTimeout(() => this.refreshUnfinished(snapshotted), 500);
    }
  }

  _promptEvent(event) {
    let prompt = this.prompts.get(event.prompt_id);
    if (!prompt) {
      prompt = new PromptState(event.prompt_id);
      this.prompts.set(prompt.id, prompt);
    }
    // After relay.done only the storage of its files (and a snapshot) has news.
    if (prompt.done && event.type !== "relay.snapshot" && event.type !== "relay.stored") return;
    const wasDone = prompt.done;
    this._apply(prompt, event);
    prompt.updatedAt = Date.now();
    this._emit("prompt", { prompt, event });
    if (prompt.done && !wasDone) this._emit("done", { prompt });
  }

  _timing(prompt, event) {
    if (typeof event.percent === "number") prompt.percent = event.percent;
    if (typeof event.elapsed === "number") prompt.elapsed = event.elapsed;
    if (typeof event.total === "number") prompt.total = event.total;
    prompt.eta = typeof event.eta === "number" ? event.eta : null;
  }

  _apply(prompt, event) {
    switch (event.type) {
      case "relay.queued":
        prompt.workflow = event.workflow || prompt.workflow;
        prompt.number = event.number;
        prompt.total = event.total;
        for (const spec of event.steps || []) {
          const step = prompt.step(spec.node);
          step.classType = spec.class_type;
          step.name = spec.name;
        }
        if (prompt.phase === "submitted") prompt.phase = "queued";
        return;
      case "relay.started":
        prompt.phase = "running";
        prompt.queuedFor = event.queued_for;
        (event.cached || []).forEach((node, i) => {
          const step = prompt.step(node);
          Object.assign(step, { state: "cached", index: i + 1, duration: 0 });
        });
        prompt.completed = event.completed ?? prompt.completed;
        this._timing(prompt, event);
        return;
      case "relay.step": {
        prompt.phase = "running";
        const step = prompt.step(event.node);
        const again = step.state === "running" && event.state === "running"; // only its activity changed
        Object.assign(step, { classType: event.class_type, name: event.name, index: event.index, state: event.state });
        step.activity = event.state === "running" ? event.activity ?? null : null;
        if (event.state === "running") {
          prompt.current = step.node;
          if (!again) prompt.progress = null;
        } else {
          step.duration = event.duration ?? step.duration;
          if (prompt.current === step.node) prompt.current = null;
        }
        prompt.completed = prompt.steps.filter((s) => s.state === "done" || s.state === "cached").length;
        this._timing(prompt, event);
        return;
      }
      case "relay.progress":
        prompt.current = String(event.node);
        prompt.progress = { value: event.value, max: event.max };
        this._timing(prompt, event);
        return;
      case "relay.preview":
        prompt.preview = this.url(event.url);
        return;
      case "relay.output": {
        const known = new Set(prompt.files.map((f) => f.url));
        for (const file of event.files || []) {
          const entry = { ...file, node: String(event.node), url: this.url(file.url) };
          if (!known.has(entry.url)) prompt.files.push(entry);
        }
        return;
      }
      case "relay.detached":
        prompt.detached = true;
        prompt.progress = null;
        prompt.eta = null;
        return;
      case "relay.done":
        this._finish(prompt, event.status, event.error || null, event.outputs, event);
        if (event.storage && !prompt.storage) {
          const files = (event.storage.files || []).map((f) => ({ ...f, state: "pending" }));
          prompt.storage = { state: "storing", bucket: event.storage.bucket, files };
          this._linkStored(prompt);
        }
        return;
      case "relay.stored":
        this._stored(prompt, event);
        return;
      case "relay.snapshot":
        this._snapshot(prompt, event);
        return;
      default:
    }
  }

  _finish(prompt, status, error, outputs, timing) {
    prompt.phase = "done";
    prompt.status = status;
    prompt.error = error;
    prompt.recovered = Boolean(timing?.recovered);
    prompt.current = null;
    prompt.progress = null;
    prompt.eta = null;
    if (timing) {
      if (typeof timing.elapsed === "number") prompt.elapsed = timing.elapsed;
      if (typeof timing.percent === "number") prompt.percent = timing.percent;
    }
    if (status === "success") {
      prompt.percent = 100;
      for (const step of prompt.steps) if (step.state === "pending" || step.state === "running") step.state = "done";
    }
    if (!prompt.files.length && outputs) {
      prompt.files = outputFiles(outputs).map((f) => ({ ...f, url: this.url(f.url) }));
    }
  }

  _stored(prompt, event) {
    if (!prompt.storage) prompt.storage = { state: "storing", bucket: null, files: [] };
    const storage = prompt.storage;
    let entry = storage.files.find((f) => f.key === event.key);
    if (!entry) {
      entry = { node: String(event.node), filename: event.filename, kind: event.kind, key: event.key };
      storage.files.push(entry);
    }
    Object.assign(entry, {
      state: event.state,
      url: event.url ?? null,
      expires: event.expires ?? null,
      size: event.size ?? null,
      contentType: event.content_type ?? null,
      error: event.error ?? null,
      attempts: event.attempts,
    });
    if (event.remaining === 0 || storage.files.every((f) => f.state !== "pending")) {
      const stored = storage.files.filter((f) => f.state === "stored").length;
      storage.state = stored === storage.files.length ? "stored" : stored ? "partial" : "failed";
    }
    this._linkStored(prompt);
  }

  /** Give each output file its storage entry (`file.stored`), matched by node and file name. */
  _linkStored(prompt) {
    for (const file of prompt.files) {
      const entry = prompt.storage?.files.find((f) => f.node === String(file.node) && f.filename === file.filename);
      if (entry) file.stored = entry;
    }
  }

  _snapshot(prompt, event) {
    this._snapshotted?.add(prompt.id);
    if (prompt.done) return;
    prompt.phase = event.phase === "finished" ? prompt.phase : event.phase;
    prompt.number = event.number ?? prompt.number;
    prompt.total = event.total ?? prompt.total;
    prompt.completed = event.completed ?? prompt.completed;
    prompt.percent = event.percent ?? prompt.percent;
    prompt.elapsed = event.elapsed ?? prompt.elapsed;
    prompt.current = event.current == null ? null : String(event.current);
    prompt.progress = null;
    prompt.eta = null;
    for (const spec of event.steps || []) {
      const step = prompt.step(spec.node);
      Object.assign(step, {
        classType: spec.class_type,
        name: spec.name,
        index: spec.index,
        state: spec.state,
        duration: spec.duration,
      });
    }
    const files = outputFiles(event.outputs).map((f) => ({ ...f, url: this.url(f.url) }));
    if (files.length) prompt.files = files;
  }

  /**
   * Settle prompts the relay may no longer report (after it restarted): each unfinished one is
   * looked up in ComfyUI's history and queue; finished ones get their final state.
   */
  async refreshUnfinished(skip = new Set()) {
    const open = [...this.prompts.values()].filter((p) => !p.done && !p.inFlight && !skip.has(p.id));
    if (!open.length) return;
    let queue;
    try {
      queue = await this.queue();
    } catch {
      return;
    }
    const waiting = new Set([...queue.running, ...queue.pending].map((item) => item.id));
    for (const prompt of open) {
      if (prompt.done) continue;
      const entry = await this.historyEntry(prompt.id).catch(() => null);
      if (entry) {
        this._settleFromHistory(prompt, entry);
      } else if (!waiting.has(prompt.id)) {
        const error = { node: null, class_type: null, exception_type: "PromptLost", message: "ComfyUI no longer knows this prompt" };
        this._settleFromHistory(prompt, { status: { messages: [] }, outputs: {} }, error);
      } else {
        this._watchHistory(prompt.id);
      }
    }
  }

  _watchHistory(id) {
    // The relay may not follow this prompt any more; look it up now and then until it ends.
    const check = async () => {
      const prompt = this.prompts.get(id);
      if (!prompt || prompt.done) return;
      const entry = await this.historyEntry(id).catch(() => null);
      if (entry) this._settleFromHistory(prompt, entry);
      else setTimeout(check, 2000);
    };
    setTimeout(check, 2000);
  }

  _settleFromHistory(prompt, entry, lostError = null) {
    if (prompt.done) return;
    prompt.workflow = prompt.workflow || entry.prompt?.[3]?.workflow || null;
    const messages = Object.fromEntries((entry.status?.messages || []).filter((m) => Array.isArray(m)));
    let status = "success";
    let error = lostError;
    if (lostError) status = "error";
    else if (messages.execution_error) {
      const data = messages.execution_error;
      status = "error";
      error = { node: data.node_id, class_type: data.node_type, exception_type: data.exception_type, message: String(data.exception_message || "").trim() };
    } else if (messages.execution_interrupted) {
      status = "interrupted";
      error = { node: messages.execution_interrupted.node_id, class_type: messages.execution_interrupted.node_type, exception_type: null, message: "interrupted" };
    }
    const start = messages.execution_start?.timestamp;
    const end = (messages.execution_success || messages.execution_error || messages.execution_interrupted)?.timestamp;
    const timing = { recovered: true };
    if (typeof start === "number" && typeof end === "number") timing.elapsed = Math.max(0, (end - start) / 1000);
    this._finish(prompt, status, error, entry.outputs || {}, timing);
    this._emit("prompt", { prompt, event: null });
    this._emit("done", { prompt });
  }

  /** Follow a prompt submitted elsewhere (another tab, a reload): its events update its state. */
  track(promptId) {
    if (!this.prompts.has(promptId)) this.prompts.set(promptId, new PromptState(promptId));
    return this.prompts.get(promptId);
  }

  // HTTP -----------------------------------------------------------------------------------

  /**
   * An absolute URL for a path the relay gave (a /view or /previews URL), for an <img> or a
   * link: with the token in its query when the relay needs one, since those send no headers.
   */
  url(path) {
    const url = new URL(path, this.baseUrl + "/");
    if (this.token) url.searchParams.set("token", this.token);
    return url.toString();
  }

  async _fetch(method, path, { json, body, headers = {} } = {}) {
    const init = { method, headers: { ...headers } };
    if (this.token) init.headers.Authorization = `Bearer ${this.token}`;
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (body !== undefined) {
      init.body = body;
    }
    const response = await fetch(this.baseUrl + path, init);
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = text;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      const message = typeof error === "object" ? error.message || error.type : String(error);
      throw new RelayError(response.status, error.type || "http_error", message || `HTTP ${response.status}`, data);
    }
    return data;
  }

  /**
   * The workflows the relay knows: [{name, title, description, steps, parameters, store}].
   * Also sets `storageAvailable`: whether the relay can keep results in S3-compatible storage.
   */
  async workflows() {
    const answer = await this._fetch("GET", "/workflows");
    this.storageAvailable = Boolean(answer.storage);
    return answer.workflows;
  }

  _submitted(promptId, workflow) {
    const prompt = this.track(promptId);
    prompt.workflow = workflow || prompt.workflow;
    prompt.inFlight = true; // not yet answered: not looked up in history meanwhile
    this._emit("prompt", { prompt, event: null });
    return prompt;
  }

  async _submit(path, body, workflow) {
    // The prompt id is chosen here, so events that beat the HTTP answer are already ours.
    const promptId = uuid4();
    this._submitted(promptId, workflow);
    try {
      return await this._fetch("POST", path, { json: { ...body, client_id: this.clientId, prompt_id: promptId } });
    } catch (error) {
      this.prompts.delete(promptId);
      throw error;
    } finally {
      const prompt = this.prompts.get(promptId);
      if (prompt) prompt.inFlight = false;
    }
  }

  /**
   * Fill and submit a workflow; resolves to the relay's answer (prompt_id, number, ...).
   * `extra` becomes the prompt's extra_data: `{store: true}` keeps its files in storage,
   * `{webhook_url}` has the relay tell that URL (on its allow-list) when it ends.
   */
  async submitWorkflow(name, params = {}, extra = {}) {
    const body = Object.keys(extra).length ? { params, extra_data: extra } : { params };
    return this._submit(`/workflows/${encodeURIComponent(name)}/prompt`, body, name);
  }

  /** Submit an API-format graph as POST /prompt does. */
  async submitPrompt(graph, extra = {}) {
    return this._submit("/prompt", { ...extra, prompt: graph }, null);
  }

  /** Upload an image (a File or Blob); resolves to the name to give a workflow's image parameter. */
  async upload(file, { subfolder = "", overwrite = false, filename } = {}) {
    const form = new FormData();
    form.append("image", file, filename || file.name || "image.png");
    form.append("type", "input");
    if (subfolder) form.append("subfolder", subfolder);
    if (overwrite) form.append("overwrite", "true");
    const stored = await this._fetch("POST", "/upload/image", { body: form });
    return { ...stored, value: stored.subfolder ? `${stored.subfolder}/${stored.name}` : stored.name };
  }

  /** ComfyUI's queue: {running: [{id, number}], pending: [{id, number}]} in run order. */
  async queue() {
    const data = await this._fetch("GET", "/queue");
    const items = (list) => (list || []).map((item) => ({ number: item[0], id: item[1], extra: item[3] || {} }));
    return { running: items(data.queue_running), pending: items(data.queue_pending) };
  }

  /** Recent prompts from ComfyUI's history, newest first: [{id, status, files}]. */
  async history(maxItems = 10) {
    const data = await this._fetch("GET", `/history?max_items=${maxItems}`);
    return Object.entries(data || {})
      .map(([id, entry]) => ({
        id,
        number: entry.prompt?.[0],
        workflow: entry.prompt?.[3]?.workflow || null,
        clientId: entry.prompt?.[3]?.client_id || null,
        status: entry.status?.status_str || null,
        interrupted: (entry.status?.messages || []).some((m) => m[0] === "execution_interrupted"),
        files: outputFiles(entry.outputs).map((f) => ({ ...f, url: this.url(f.url) })),
      }))
      .sort((a, b) => (b.number ?? 0) - (a.number ?? 0));
  }

  /** One prompt's history entry, or null while ComfyUI has none. */
  async historyEntry(promptId) {
    const data = await this._fetch("GET", `/history/${encodeURIComponent(promptId)}`);
    const entry = data && data[promptId];
    return entry && entry.status && (entry.status.messages || []).length ? entry : null;
  }

  /**
   * Cancel a prompt: removed from the queue if it has not started (it ends "cancelled"),
   * interrupted if it runs. The relay does it in one request (ComfyUI's atomic job cancel
   * where the server has one). Resolves to true if something was cancelled, false if the
   * prompt had already ended.
   */
  async cancel(promptId) {
    const answer = await this._fetch("POST", `/prompt/${encodeURIComponent(promptId)}/cancel`);
    return Boolean(answer && answer.cancelled);
  }
}
