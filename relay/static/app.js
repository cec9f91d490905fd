// The relay's progress page: pick a workflow, submit, watch its steps, see the result.
// Plain DOM on top of relay-client.js; no build step.

import { RelayClient } from "./relay-client.js";

const TEXTS = {
  ko: {
    connecting: "연결 중…",
    connected: "연결됨",
    reconnecting: "재연결 중…",
    resumed: "재연결됨 · 이어받음",
    reloaded: "재연결됨 · 상태 다시 받음",
    closed: "연결 끊김",
    upstreamConnected: "ComfyUI 연결됨",
    upstreamReconnecting: "ComfyUI 재연결 중…",
    upstreamConnecting: "ComfyUI 연결 중…",
    upstreamUnknown: "ComfyUI 대기",
    newJob: "새 작업",
    workflow: "워크플로",
    submit: "생성 시작",
    submitting: "제출 중…",
    progress: "진행 상황",
    noRun: "워크플로를 선택하고 생성을 시작하면 여기에서 단계별 진행 상황을 볼 수 있습니다.",
    livePreview: "실시간 미리보기",
    queue: "대기열",
    running: "실행 중",
    pending: "대기 중",
    recent: "최근 기록",
    nothing: "없음",
    cancel: "취소",
    stop: "중단",
    elapsed: "경과",
    eta: "남은 시간",
    queuedAhead: (n) => (n > 0 ? `대기 중 · 앞에 ${n}개` : "대기 중 · 곧 시작"),
    starting: "시작 준비 중…",
    detached: "ComfyUI 연결이 끊겼다 다시 이어져 이 작업의 진행 상황은 더 받을 수 없습니다. 끝나면 결과를 보여 드립니다.",
    status: { queued: "대기 중", running: "실행 중", success: "완료", error: "실패", interrupted: "중단됨", cancelled: "취소됨", submitted: "제출됨" },
    failedAt: "실패한 단계",
    store: "결과를 저장소에 보관",
    storing: "저장소에 보관 중…",
    storedLink: "보관된 파일",
    notStored: "보관 실패",
    recovered: "재연결 후 ComfyUI 기록에서 확인한 결과입니다.",
    imageHint: "비워 두면 기본 이미지를 사용합니다",
    chooseImage: "이미지 선택",
    noFile: "선택한 파일 없음",
    defaultImage: (name) => `기본: ${name}`,
    client: "클라이언트",
    other: "English",
    seconds: (s) => (s < 60 ? `${s.toFixed(1)}초` : `${Math.floor(s / 60)}분 ${String(Math.round(s % 60)).padStart(2, "0")}초`),
    stepOf: (i, n) => `[${i}/${n}]`,
    activity: (what) => ({ loading: "불러오는 중" })[what] || what,
  },
  en: {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    resumed: "Reconnected · resumed",
    reloaded: "Reconnected · state reloaded",
    closed: "Disconnected",
    upstreamConnected: "ComfyUI connected",
    upstreamReconnecting: "ComfyUI reconnecting…",
    upstreamConnecting: "ComfyUI connecting…",
    upstreamUnknown: "ComfyUI idle",
    newJob: "New job",
    workflow: "Workflow",
    submit: "Generate",
    submitting: "Submitting…",
    progress: "Progress",
    noRun: "Pick a workflow and start it: its steps, progress and result appear here.",
    livePreview: "Live preview",
    queue: "Queue",
    running: "Running",
    pending: "Pending",
    recent: "Recent",
    nothing: "Nothing",
    cancel: "Cancel",
    stop: "Stop",
    elapsed: "elapsed",
    eta: "left",
    queuedAhead: (n) => (n > 0 ? `Queued · ${n} ahead` : "Queued · starting soon"),
    starting: "Getting ready…",
    detached: "The link to ComfyUI was lost and made again: this job's progress can no longer be followed. Its result shows when it ends.",
    status: { queued: "Queued", running: "Running", success: "Done", error: "Failed", interrupted: "Interrupted", cancelled: "Cancelled", submitted: "Submitted" },
    failedAt: "Failed step",
    store: "Keep the results in storage",
    storing: "Saving to storage…",
    storedLink: "stored copy",
    notStored: "not stored",
    recovered: "Result read from ComfyUI's history after reconnecting.",
    imageHint: "Leave empty to use the default image",
    chooseImage: "Choose image",
    noFile: "No file chosen",
    defaultImage: (name) => `Default: ${name}`,
    client: "client",
    other: "한국어",
    seconds: (s) => (s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} m ${String(Math.round(s % 60)).padStart(2, "0")} s`),
    stepOf: (i, n) => `[${i}/${n}]`,
    activity: (what) => ({ loading: "loading" })[what] || what,
  },
};

const params = new URLSearchParams(location.search);
const lang = ["ko", "en"].includes(params.get("lang")) ? params.get("lang") : localStorage.getItem("comfy-relay.lang") || "ko";
const T = TEXTS[lang] || TEXTS.ko;
document.documentElement.lang = lang;

function clientId() {
  let id = params.get("clientId") || localStorage.getItem("comfy-relay.clientId");
  if (!id || !/^[A-Za-z0-9_-]{1,64}$/.test(id)) id = "web-" + Math.random().toString(16).slice(2, 12);
  localStorage.setItem("comfy-relay.clientId", id);
  return id;
}

// A relay with RELAY_TOKEN set is opened as /#token=...: the fragment never reaches a server
// or a log. The token is kept for this tab only and taken out of the address bar.
function accessToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("comfy-relay.token", fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("comfy-relay.token");
}

const relay = new RelayClient({ clientId: clientId(), lang, token: accessToken() });
const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const state = {
  workflows: [],
  byName: new Map(),
  current: sessionStorage.getItem("comfy-relay.prompt"),
  queueAhead: null,
  resumedTimer: null,
};

// Static texts ---------------------------------------------------------------------------

for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = T[node.dataset.i18n];
$("lang-toggle").textContent = T.other;
$("lang-toggle").addEventListener("click", () => {
  const next = lang === "ko" ? "en" : "ko";
  localStorage.setItem("comfy-relay.lang", next);
  const url = new URL(location.href);
  url.searchParams.set("lang", next);
  location.href = url.toString();
});
$("client-label").textContent = `${T.client} ${relay.clientId}`;

// Connection badges ----------------------------------------------------------------------

relay.on("state", ({ state: s, resumed, reconnected }) => {
  const badge = $("connection");
  clearTimeout(state.resumedTimer);
  if (s === "connected" && reconnected) {
    // Back after a drop: replayed from the relay's buffer, or rebuilt from its snapshot/history.
    setBadge(badge, "resumed", resumed ? T.resumed : T.reloaded);
    state.resumedTimer = setTimeout(() => setBadge(badge, "connected", T.connected), 6000);
    return;
  }
  setBadge(badge, s, T[s] || s);
});

function setBadge(badge, value, text) {
  badge.dataset.state = value;
  badge.querySelector(".text").textContent = text;
}

let upstreamSeen = false;
relay.on("upstream", ({ state: s }) => {
  const badge = $("upstream");
  if (s === "connected") {
    upstreamSeen = true;
    setBadge(badge, "connected", T.upstreamConnected);
  } else if (s === "down" || (s === "connecting" && upstreamSeen)) {
    setBadge(badge, "reconnecting", T.upstreamReconnecting);
  } else if (s === "connecting") {
    setBadge(badge, "connecting", T.upstreamConnecting);
  } else {
    setBadge(badge, "unknown", T.upstreamUnknown);
  }
});
setBadge($("upstream"), "unknown", T.upstreamUnknown);

// The form ---------------------------------------------------------------------------------

async function loadWorkflows() {
  state.workflows = await relay.workflows();
  state.byName = new Map(state.workflows.map((w) => [w.name, w]));
  const select = $("workflow");
  select.replaceChildren(...state.workflows.map((w) => h("option", { value: w.name }, `${w.title[lang]} (${w.name})`)));
  const remembered = localStorage.getItem("comfy-relay.workflow");
  select.value = state.byName.has(params.get("workflow")) ? params.get("workflow") : state.byName.has(remembered) ? remembered : "portrait_mode";
  if (!select.value && state.workflows.length) select.value = state.workflows[0].name;
  select.addEventListener("change", () => {
    localStorage.setItem("comfy-relay.workflow", select.value);
    renderForm();
  });
  const store = $("store");
  store.hidden = !relay.storageAvailable;
  store.querySelector("input").checked = localStorage.getItem("comfy-relay.store") === "1";
  store.querySelector("input").addEventListener("change", (event) => {
    localStorage.setItem("comfy-relay.store", event.target.checked ? "1" : "0");
  });
  renderForm();
}

/** Under a result: where its stored copy is (a presigned URL), or that it is on its way or failed. */
function storedLine(file) {
  const stored = file.stored;
  if (!stored) return null;
  if (stored.state === "stored" && stored.url) {
    return h("a", { class: "stored", href: stored.url, target: "_blank", rel: "noopener", dataset: { state: "stored" } }, `${T.storedLink} ↗`);
  }
  if (stored.state === "failed") return h("span", { class: "stored", dataset: { state: "failed" }, title: stored.error || "" }, T.notStored);
  return h("span", { class: "stored", dataset: { state: "pending" } }, T.storing);
}

function renderForm() {
  const workflow = state.byName.get($("workflow").value);
  $("workflow-description").textContent = workflow ? workflow.description[lang] : "";
  const form = $("params");
  form.replaceChildren();
  if (!workflow) return;
  const numbers = [];
  for (const [name, spec] of Object.entries(workflow.parameters)) {
    const label = spec.description?.[lang] || name;
    const id = `param-${name}`;
    let input;
    if (spec.type === "string") {
      const long = /prompt/.test(name);
      input = long
        ? h("textarea", { id, name, rows: name.startsWith("negative") ? 2 : 3 }, spec.default ?? "")
        : h("input", { id, name, type: "text", value: spec.default ?? "" });
    } else if (spec.type === "int" || spec.type === "float") {
      input = h("input", {
        id, name, type: "number", value: spec.default ?? "",
        min: spec.min, max: spec.max,
        step: spec.type === "int" ? spec.multiple_of || 1 : "any",
      });
    } else if (spec.type === "bool") {
      input = h("input", { id, name, type: "checkbox", checked: Boolean(spec.default) });
      form.append(h("label", { class: "field check" }, input, label));
      continue;
    } else if (spec.type === "choice") {
      input = h("select", { id, name }, spec.choices.map((c) => h("option", { value: c, selected: c === spec.default }, c)));
    } else if (spec.type === "image") {
      const thumb = h("img", { alt: "", id: `${id}-thumb`, src: relay.url(`/view?filename=${encodeURIComponent(spec.default || "")}&type=input`) });
      // The browser's own file control sizes itself by its text, in the browser's language, and
      // cannot shrink: a hidden input behind a label we style keeps the form within a phone's width.
      input = h("input", { id, name, type: "file", accept: "image/*", class: "file-input" });
      const chosen = h("span", { class: "file-name", id: `${id}-name` }, T.noFile);
      input.addEventListener("change", () => {
        const file = input.files[0];
        chosen.textContent = file ? file.name : T.noFile;
        chosen.title = file ? file.name : "";
        if (file) thumb.src = URL.createObjectURL(file);
      });
      form.append(
        h("div", { class: "field" },
          h("span", { class: "label" }, label),
          h("div", { class: "image-field" },
            thumb, h("div", { class: "file-pick" }, input, h("label", { class: "file-button", for: id }, T.chooseImage), chosen)),
          h("span", { class: "hint" }, spec.default ? T.defaultImage(spec.default) : T.imageHint)),
      );
      continue;
    }
    const field = h("label", { class: "field", for: id }, h("span", { class: "label" }, label), input);
    if (spec.type === "int" || spec.type === "float") numbers.push(field);
    else form.append(field);
  }
  for (let i = 0; i < numbers.length; i += 2) form.append(h("div", { class: "row" }, numbers.slice(i, i + 2)));
}

async function collectParams(workflow) {
  const values = {};
  for (const [name, spec] of Object.entries(workflow.parameters)) {
    const input = $(`param-${name}`);
    if (!input) continue;
    if (spec.type === "image") {
      if (input.files && input.files[0]) values[name] = (await relay.upload(input.files[0])).value;
    } else if (spec.type === "bool") {
      values[name] = input.checked;
    } else if (spec.type === "int" || spec.type === "float") {
      if (input.value === "") continue;
      values[name] = Number(input.value);
    } else {
      values[name] = input.value;
    }
  }
  return values;
}

$("submit").addEventListener("click", async () => {
  const workflow = state.byName.get($("workflow").value);
  if (!workflow) return;
  const button = $("submit");
  const errorBox = $("form-error");
  errorBox.hidden = true;
  button.disabled = true;
  button.textContent = T.submitting;
  try {
    const values = await collectParams(workflow);
    const keep = relay.storageAvailable && $("store").querySelector("input").checked;
    const answer = await relay.submitWorkflow(workflow.name, values, keep ? { store: true } : {});
    follow(answer.prompt_id);
    if (window.matchMedia("(max-width: 900px)").matches) $("run").scrollIntoView({ behavior: "smooth" });
  } catch (error) {
    errorBox.textContent = error.message || String(error);
    errorBox.hidden = false;
  } finally {
    button.disabled = false;
    button.textContent = T.submit;
    scheduleQueue();
  }
});

// The run ----------------------------------------------------------------------------------

function follow(promptId) {
  state.current = promptId;
  sessionStorage.setItem("comfy-relay.prompt", promptId);
  relay.track(promptId);
  renderRun();
}

relay.on("prompt", ({ prompt }) => {
  if (prompt.id === state.current) renderRun();
});
relay.on("done", ({ prompt }) => {
  if (prompt.id === state.current) renderRun();
  scheduleQueue();
  // ComfyUI moves a finished prompt from its queue to its history just after saying it ended.
  setTimeout(scheduleQueue, 1000);
});
relay.on("queue", () => scheduleQueue());

function stepsOf(prompt) {
  if (prompt.steps.length) return prompt.steps;
  // Settled from history only: the workflow's own step list, all in the final state.
  const workflow = state.byName.get(prompt.workflow);
  if (!workflow) return [];
  const final = prompt.status === "success" ? "done" : "pending";
  return workflow.steps.map((s, i) => ({ node: s.node, name: s.name[lang], index: i + 1, state: final, duration: null }));
}

function orderedSteps(prompt) {
  // Steps that began, by index; then the rest in the order they are expected to run.
  const steps = stepsOf(prompt);
  const started = steps.filter((s) => s.index != null).sort((a, b) => a.index - b.index);
  return [...started, ...steps.filter((s) => s.index == null)];
}

function renderRun() {
  const run = $("run");
  const prompt = state.current ? relay.prompts.get(state.current) : null;
  $("run-empty").hidden = Boolean(prompt);
  $("run-main").hidden = !prompt;
  if (!prompt) {
    run.dataset.phase = "idle";
    return;
  }
  const workflow = state.byName.get(prompt.workflow);
  $("run-title").textContent = workflow ? workflow.title[lang] : T.progress;
  run.dataset.phase = prompt.phase;
  run.dataset.status = prompt.status || prompt.phase;
  run.dataset.promptId = prompt.id;
  const pill = $("run-status");
  const statusKey = prompt.done ? prompt.status : prompt.phase;
  pill.dataset.status = statusKey;
  pill.textContent = T.status[statusKey] || statusKey;

  const steps = orderedSteps(prompt);
  const total = prompt.total || steps.length;
  const list = $("steps");
  list.replaceChildren(
    ...steps.map((step, i) =>
      h("li", { dataset: { node: step.node, state: step.state } },
        h("span", { class: "index" }, step.index ?? i + 1),
        h("span", { class: "name" }, step.name),
        h("span", { class: "duration" }, step.duration != null && step.state !== "cached" ? T.seconds(step.duration) : "")),
    ),
  );
  renderCurrent(prompt, total);
  renderTiming();

  const preview = $("preview");
  const showPreview = Boolean(prompt.preview) && !(prompt.done && prompt.files.length);
  preview.hidden = !showPreview;
  if (showPreview && $("preview-image").src !== prompt.preview) $("preview-image").src = prompt.preview;

  const results = $("results");
  results.hidden = !prompt.files.length;
  results.replaceChildren(
    ...prompt.files.map((file) => {
      const video = /\.(mp4|webm|mov)$/i.test(file.filename);
      const media = video
        ? h("video", { src: file.url, controls: true, autoplay: true, loop: true, muted: true, playsinline: true })
        : h("img", { src: file.url, alt: file.filename, class: "result" });
      return h("figure", { class: "result-item", dataset: { kind: file.kind } }, media, h("a", { href: file.url, target: "_blank", rel: "noopener" }, file.filename), storedLine(file));
    }),
  );

  const errorBox = $("run-error");
  const lines = [];
  if (prompt.done && prompt.status !== "success" && prompt.error) {
    const failed = steps.find((s) => s.node === String(prompt.error.node));
    if (failed) lines.push(`${T.failedAt}: ${T.stepOf(failed.index ?? "?", total)} ${failed.name}`);
    const kind = prompt.error.exception_type;
    lines.push(kind ? `${kind}: ${prompt.error.message}` : prompt.error.message);
  }
  if (prompt.done && prompt.recovered) lines.push(T.recovered);
  errorBox.hidden = !lines.length;
  errorBox.textContent = lines.join("\n");
  errorBox.classList.toggle("note", prompt.done && prompt.status === "success");
}

function renderCurrent(prompt, total) {
  const current = $("current");
  current.replaceChildren();
  if (prompt.done) return;
  if (prompt.phase === "queued" || prompt.phase === "submitted") {
    current.textContent = state.queueAhead == null ? T.status.queued : T.queuedAhead(state.queueAhead);
    return;
  }
  if (prompt.detached) {
    current.append(h("span", { class: "detached" }, T.detached));
    return;
  }
  const step = prompt.currentStep;
  if (!step) {
    current.textContent = T.starting;
    return;
  }
  current.append(h("strong", {}, `${T.stepOf(step.index ?? "?", total)} `), step.name);
  if (step.activity) current.append(h("span", { class: "activity" }, ` · ${T.activity(step.activity)}`));
  if (prompt.progress && prompt.progress.max > 0) {
    const fraction = Math.min(1, prompt.progress.value / prompt.progress.max);
    current.append(
      h("span", { class: "sampler" },
        h("span", { class: "mini" }, fill(fraction)),
        `${prompt.progress.value}/${prompt.progress.max}`),
    );
  }
}

function fill(fraction) {
  const bar = h("span");
  bar.style.width = `${(fraction * 100).toFixed(1)}%`; // CSSOM: allowed by the page's CSP
  return bar;
}

function renderTiming() {
  const prompt = state.current ? relay.prompts.get(state.current) : null;
  if (!prompt) return;
  // Between events the clock keeps going: elapsed counts up and the ETA down from the last event.
  const since = prompt.phase === "running" ? (Date.now() - prompt.updatedAt) / 1000 : 0;
  const percent = prompt.percent || 0;
  $("overall-fill").style.width = `${percent}%`;
  $("overall-bar").setAttribute("aria-valuenow", String(percent));
  $("percent").textContent = `${percent.toFixed(1)}%`;
  const parts = [];
  if (prompt.phase === "running" || prompt.done) parts.push(`${T.elapsed} ${T.seconds(prompt.elapsed + since)}`);
  if (prompt.phase === "running" && prompt.eta != null) parts.push(`${T.eta} ${T.seconds(Math.max(0, prompt.eta - since))}`);
  $("timing").textContent = parts.join(" · ");
}
setInterval(renderTiming, 250);

// The queue panel ---------------------------------------------------------------------------

let queueTimer = null;
function scheduleQueue() {
  clearTimeout(queueTimer);
  queueTimer = setTimeout(renderQueue, 150);
}

function jobLabel(id, workflowName) {
  const workflow = state.byName.get(workflowName);
  return h("span", { class: "what" }, workflow ? workflow.title[lang] : workflowName || "prompt", " ", h("span", { class: "id" }, id.slice(0, 8)));
}

async function renderQueue() {
  let queue;
  let history;
  try {
    [queue, history] = await Promise.all([relay.queue(), relay.history(32)]);
  } catch {
    return; // the relay or ComfyUI is away: the badges say so; try again on the next change
  }
  const none = () => h("li", { class: "none" }, T.nothing);
  const item = (job, button) =>
    h("li", { dataset: { promptId: job.id } }, jobLabel(job.id, job.extra.workflow), button);
  const cancelButton = (job, text) =>
    h("button", {
      type: "button", class: "cancel",
      onclick: async (event) => {
        event.target.disabled = true;
        try {
          await relay.cancel(job.id);
        } finally {
          scheduleQueue();
        }
      },
    }, text);
  // The queue is ComfyUI's, shared by every client: all of it shows (it is what runs before
  // you), but only this client's own jobs can be cancelled from here.
  const mine = (job) => job.extra.client_id === relay.clientId;
  const rows = (jobs, text) =>
    jobs.length ? jobs.map((job) => item(job, mine(job) ? cancelButton(job, text) : null)) : [none()];
  $("queue-running").replaceChildren(...rows(queue.running, T.stop));
  $("queue-pending").replaceChildren(...rows(queue.pending, T.cancel));
  const ahead = queue.pending.findIndex((job) => job.id === state.current);
  state.queueAhead = ahead >= 0 ? ahead + queue.running.length : null;
  const own = history.filter((entry) => entry.clientId === relay.clientId).slice(0, 8);
  $("queue-history").replaceChildren(
    ...(own.length
      ? own.map((entry) => {
          const image = entry.files.find((f) => f.kind === "images");
          const status = entry.interrupted ? "interrupted" : entry.status;
          return h("li", { dataset: { promptId: entry.id } },
            image ? h("img", { class: "thumb", src: image.url, alt: "" }) : null,
            jobLabel(entry.id, entry.workflow),
            h("span", { class: "state", dataset: { status } }, T.status[status] || status || ""));
        })
      : [none()]),
  );
  if (state.current) renderRun();
}

// Start ------------------------------------------------------------------------------------

if (state.current) relay.track(state.current);
relay.connect();
loadWorkflows().then(() => {
  renderRun();
  renderQueue();
});
