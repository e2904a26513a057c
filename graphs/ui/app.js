// The /ui page: a plain client of the service's public API, no framework and no build step.
// Every URL is relative, so the page also works when the application is served under a route prefix.
"use strict";

const TOKEN_KEY = "imagegen.token"; // localStorage: kept in this browser
const JOB_KEY = "imagegen.job"; // sessionStorage: the id of the job this tab follows (never the token)
const POLL_MS = 500;
const RETRY_MS = 500; // the first wait after a lost connection; doubled at each failure in a row
const RETRY_MAX_MS = 15000;
const GALLERY_MS = 3000; // how often the gallery is read again while it lists unfinished jobs
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const STATE_TEXT = {
  idle: "Nothing running.",
  unknown: "Not followed",
  queued: "Queued",
  processing: "Running",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

const $ = (id) => document.getElementById(id);

// --- calling the API ---------------------------------------------------------------------------------------

const MIB = 1024 * 1024;
const mib = (bytes) => `${(bytes / MIB).toFixed(1)} MiB`;

// Says what went wrong in words a user can act on: the server's own message where it sent one, never a bare
// "Failed to fetch" or "HTTP 502".
function explain(status, body, retryAfter, sent) {
  const said = body && body.error;
  const field = body && body.details && body.details.field;
  const again = retryAfter !== null ? `; retry in ${retryAfter} s` : "";
  if (status === 0) return "Cannot reach the service: it may be down, or this browser offline";
  if (status === 502 || status === 504) {
    return `The gateway in front of the service cannot reach it (HTTP ${status}): it may be down or restarting${again}`;
  }
  if (status === 413) {
    const limit = body && body.details && body.details.limit;
    return `The request is ${mib(sent)}, over the service's limit${limit ? ` of ${mib(limit)}` : ""}: an image is `
      + "sent as base64, which adds a third to its file's size";
  }
  if (status === 503) return `${said || "The service is unavailable"}${again}`;
  if (status === 429) return `${said || "Too many requests"}${again}`;
  const message = said || `HTTP ${status}`;
  return field && !message.startsWith(`${field}:`) ? `${message} (${field})` : message;
}

function retryAfterOf(response) {
  const header = response.headers.get("retry-after");
  if (!header) return null;
  const seconds = /^\d+$/.test(header.trim()) ? Number(header) : Math.ceil((Date.parse(header) - Date.now()) / 1000);
  return Number.isFinite(seconds) ? Math.max(0, seconds) : null;
}

class ApiError extends Error {
  // status 0: no answer at all (the service or the network is down).
  constructor(status, body, { retryAfter = null, sent = 0 } = {}) {
    super(explain(status, body, retryAfter, sent));
    this.status = status;
    this.code = body && body.code;
    this.field = body && body.details && body.details.field;
    this.retryAfter = retryAfter;
  }

  get retryable() { // worth asking again later: no answer, rate limited, or the service (or its gateway) failing
    return this.status === 0 || this.status === 429 || this.status >= 500;
  }
}

const retryable = (error) => error instanceof ApiError && error.retryable;

function authHeaders() {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// fetch, with a network failure as ApiError(0); an abort (the page stopped following a job) stays an AbortError.
async function send(path, options) {
  try {
    return await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, null);
  }
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  const payload = body === undefined ? undefined : JSON.stringify(body);
  if (payload !== undefined) headers["Content-Type"] = "application/json";
  const response = await send(path, { method, headers, body: payload, signal });
  const data = await response.json().catch(() => null);
  if (response.status === 401) needToken();
  if (!response.ok) {
    throw new ApiError(response.status, data,
      { retryAfter: retryAfterOf(response), sent: payload === undefined ? 0 : new Blob([payload]).size });
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  // Built with DOM calls, never innerHTML: prompts and error texts are shown as text.
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const dataUri = (b64, mime) => (b64.startsWith("data:") ? b64 : `data:${mime};base64,${b64}`);
const truncate = (text, length = 80) => (text.length > length ? `${text.slice(0, length - 1).trimEnd()}…` : text);

function download(uri, name, described) {
  // The visible text names the file; the accessible name also says which image it is.
  return el("a", { href: uri, download: name, text: `Download ${name}`,
    "aria-label": described ? `Download ${described} (${name})` : undefined });
}

// --- access token ------------------------------------------------------------------------------------------

function showAccess(note) {
  $("access").hidden = false;
  if (note) $("access-note").textContent = note;
}

function needToken() {
  showAccess(localStorage.getItem(TOKEN_KEY)
    ? "The token was refused: enter the service's bearer token."
    : "This service needs a bearer token: enter it below. It is kept in this browser only.");
}

// A cheap authorised call tells a refused token from an accepted one before it is saved.
async function checkToken(token) {
  const response = await send("jobs?limit=1", { headers: { Accept: "application/json", Authorization: `Bearer ${token}` } });
  if (response.status === 401 || response.status === 403) return "refused";
  return response.ok ? "accepted" : `unchecked (HTTP ${response.status})`;
}

function forgetJobs() {
  // What the last token's owner made is not shown to whoever uses the page next.
  stopFollowing();
  sessionStorage.removeItem(JOB_KEY);
  clearTimeout(galleryTimer);
  galleryRound += 1; // a read already on its way is not shown
  release("gallery");
  release("result");
  $("gallery").replaceChildren();
  $("gallery-note").textContent = "";
  $("result").replaceChildren();
  $("preview-figure").hidden = true;
  delete $("status").dataset.job;
  showState("idle");
  showProgress(0, "");
}

function setupToken() {
  const stored = localStorage.getItem(TOKEN_KEY);
  if (stored) {
    $("token").value = stored;
    showAccess();
  }
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) {
      localStorage.removeItem(TOKEN_KEY);
      $("access-note").textContent = "No token saved.";
      return;
    }
    $("access-note").textContent = "Checking the token…";
    let verdict;
    try {
      verdict = await checkToken(token);
    } catch (error) {
      $("access-note").textContent = `${error.message}: the token was not checked nor saved.`;
      return;
    }
    if (verdict === "refused") {
      $("access-note").textContent = "The service refused this token: it was not saved.";
      $("token").focus();
      return;
    }
    localStorage.setItem(TOKEN_KEY, token);
    $("access-note").textContent = verdict === "accepted"
      ? "Token accepted and saved in this browser."
      : `Token saved in this browser, but the service could not check it now: ${verdict}.`;
    $("form-error").textContent = ""; // a "missing or invalid bearer token" from before no longer holds
    $("gallery-note").textContent = "";
    loadChoices();
    refreshGallery();
    resume();
  });
  $("token-forget").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    $("access-note").textContent = "Token forgotten: its jobs and images are no longer shown.";
    forgetJobs();
  });
}

// --- choices from the service ------------------------------------------------------------------------------

function fill(select, items, { empty, preferred } = {}) {
  const keep = select.value || preferred;
  select.replaceChildren();
  if (empty) select.append(el("option", { value: "", text: empty }));
  for (const item of items) select.append(el("option", { value: item.value, text: item.label || item.value }));
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

async function checkpoints() {
  try {
    const listing = await api("models");
    return listing.models.filter((m) => m.type === "base").map((m) => ({ value: m.id || m.name }));
  } catch (error) {
    if (error.status === 401) throw error;
    const models = await api("sdapi/v1/sd-models");
    return models.map((m) => ({ value: m.model_name, label: m.title }));
  }
}

async function loadNamedSizes() {
  const config = await api("generate/batch-sizes");
  const list = $("named-size-list");
  list.replaceChildren();
  for (const [name, size] of Object.entries(config.sizes)) {
    const id = `size-${name}`;
    list.append(el("span", { class: "check" },
      el("input", { type: "checkbox", id, name: "sizes", value: name }),
      el("label", { for: id, text: `${name} ${size.width} × ${size.height} (${size.aspect})` })));
  }
  list.addEventListener("change", applicable);
  applicable();
}

async function loadChoices() {
  const tasks = {
    checkpoint: async () => fill($("checkpoint"), await checkpoints()),
    sampler: async () => fill($("sampler"), (await api("sdapi/v1/samplers")).map((s) => ({ value: s.name })),
      { preferred: "Euler a" }),
    lora: async () => fill($("lora"), (await api("sdapi/v1/loras")).map((l) => ({ value: l.name })),
      { empty: "(none)" }),
    upscaler: async () => {
      const upscalers = (await api("sdapi/v1/upscalers")).filter((u) => u.name !== "None");
      const model = upscalers.find((u) => u.model_name); // a loaded network rather than a resampler
      fill($("upscaler"), upscalers.map((u) => ({ value: u.name })), { preferred: model && model.name });
    },
    sizes: loadNamedSizes,
  };
  const results = await Promise.allSettled(Object.values(tasks).map((task) => task()));
  const failed = results.filter((r) => r.status === "rejected");
  if (failed.some((r) => r.reason.status === 401)) {
    needToken();
  } else if (failed.length) {
    $("form-error").textContent = `Some choices could not be loaded: ${failed[0].reason.message}`;
  }
  document.body.dataset.ready = "true";
}

// --- the form ----------------------------------------------------------------------------------------------

function setupSizes() {
  const preset = $("size-preset");
  preset.addEventListener("change", () => {
    if (preset.value === "custom") return;
    const [width, height] = preset.value.split("x");
    $("width").value = width;
    $("height").value = height;
  });
  $("width").addEventListener("input", trackPreset);
  $("height").addEventListener("input", trackPreset);
}

function trackPreset() {
  const preset = $("size-preset");
  const value = `${$("width").value}x${$("height").value}`;
  preset.value = [...preset.options].some((o) => o.value === value) ? value : "custom";
}

const NAMED_NOTE = "Tick any to render them all from one base per aspect instead of the size above.";

// Greys out what the request would leave out, and says why: a named-size batch takes no size, sampler, hires fix
// or face restoration; hires fix renders its own sizes; seed 000's plan (hires fix, faces) takes no sampler.
function applicable() {
  const named = document.querySelectorAll("#named-size-list input:checked").length > 0;
  const hires = $("hires").checked && !named;
  const faces = $("faces").checked && !named;
  for (const id of ["size-preset", "width", "height"]) $(id).disabled = named || hires;
  $("sampler").disabled = named || hires || faces;
  $("hires").disabled = named;
  $("faces").disabled = named;
  if (!$("named-size-list").children.length) return; // still loading, or the service names no sizes
  $("named-sizes-note").textContent = named
    ? "A named size is ticked: Size, Width, Height, Sampler, Hires fix and Face restoration are not used; "
      + "each size is rendered from one base per aspect with the checkpoint, steps, guidance and seed."
    : NAMED_NOTE;
}

// A message beside the field it is about (aria-invalid, aria-describedby), the field focused.
function markInvalid(input, message) {
  let note = $(`${input.id}-error`);
  if (!note) {
    note = el("span", { id: `${input.id}-error`, class: "error field-error" });
    (input.closest(".field") || input.closest("fieldset") || input.parentElement).append(note);
    const described = [input.getAttribute("aria-describedby"), note.id].filter(Boolean).join(" ");
    input.setAttribute("aria-describedby", described);
  }
  note.textContent = message;
  input.setAttribute("aria-invalid", "true");
  input.focus();
}

function clearInvalid(scope = document) {
  scope.querySelectorAll("[aria-invalid]").forEach((input) => input.removeAttribute("aria-invalid"));
  scope.querySelectorAll(".field-error").forEach((note) => { note.textContent = ""; });
}

// Each request's names for the form's fields (text2img and batch-sizes: camelCase; /generate: snake_case).
const FIELD_CONTROLS = {
  prompt: "prompt", negativePrompt: "negative-prompt", negative_prompt: "negative-prompt", width: "width",
  height: "height", steps: "steps", num_inference_steps: "steps", guidanceScale: "guidance", guidance_scale: "guidance",
  seed: "seed", sampler: "sampler", model: "checkpoint", hires_fix: "hires", use_face_restoration: "faces",
};

function controlFor(field) {
  const name = String(field || "").split(".")[0];
  if (name === "sizes") return document.querySelector("#named-size-list input") || null;
  return FIELD_CONTROLS[name] ? $(FIELD_CONTROLS[name]) : null;
}

function setupLora() {
  $("lora-add").addEventListener("click", () => {
    const name = $("lora").value;
    if (!name) return;
    clearInvalid($("lora-weight").closest(".field"));
    let weight;
    try {
      weight = number("lora-weight");
    } catch {
      return; // number() said why beside the field
    }
    const prompt = $("prompt");
    prompt.value = `${prompt.value.trim()} <lora:${name}:${weight}>`.trim();
  });
}

class FieldError extends Error {}

function number(id) {
  const input = $(id);
  if (input.value === "" && input.id === "lora-weight") return 1;
  if (!input.checkValidity() || input.value === "") {
    const message = `${input.labels[0].textContent}: ${input.validationMessage || "a number is needed"}`;
    markInvalid(input, message);
    throw new FieldError(message);
  }
  return Number(input.value);
}

// Which job route fits the form: a named-size batch (seed 002), seed 000's plan for hires fix and face
// restoration (queued through /generate/async), otherwise seed 003's text2img with its sampler. Each takes the
// checkpoint (`model`; none: the service's default).
function plan() {
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    markInvalid($("prompt"), "Prompt: describe the image to generate");
    throw new FieldError("Prompt: describe the image to generate");
  }
  const negative = $("negative-prompt").value.trim();
  const common = { steps: number("steps"), guidance: number("guidance"), seed: number("seed") };
  const model = $("checkpoint").value || undefined; // JSON.stringify leaves an undefined field out
  const sizes = [...document.querySelectorAll("#named-size-list input:checked")].map((i) => i.value);
  if (sizes.length) {
    return { path: "generate/batch-sizes", body: { prompt, negativePrompt: negative, sizes, seed: common.seed,
      steps: common.steps, guidanceScale: common.guidance, model } };
  }
  if ($("hires").checked || $("faces").checked) {
    // Hires fix renders its own sizes: the (greyed) size fields are sent as they are, unchecked.
    const size = (id) => ($(id).disabled ? Number($(id).value) || undefined : number(id));
    return { path: "generate/async", body: { prompt, negative_prompt: negative, width: size("width"),
      height: size("height"), num_inference_steps: common.steps, guidance_scale: common.guidance, seed: common.seed,
      hires_fix: $("hires").checked, use_face_restoration: $("faces").checked, model } };
  }
  const body = { prompt, negativePrompt: negative, width: number("width"), height: number("height"),
    steps: common.steps, guidanceScale: common.guidance, seed: common.seed, sampler: $("sampler").value || "euler_a",
    model };
  return { path: "generate/text2img", body };
}

// The form as a job's request set it (a reload, or Follow in the gallery): the same settings, ready to run again.
function restoreForm(request) {
  const r = request || {};
  const set = (id, value) => { if (value !== undefined && value !== null && value !== "") $(id).value = value; };
  const choose = (id, value) => {
    if ([...$(id).options].some((o) => o.value === value)) $(id).value = value;
  };
  set("prompt", r.prompt);
  set("negative-prompt", r.negativePrompt ?? r.negative_prompt);
  set("width", r.width);
  set("height", r.height);
  trackPreset();
  set("steps", r.steps ?? r.num_inference_steps);
  set("guidance", r.guidanceScale ?? r.guidance_scale);
  set("seed", r.seed);
  choose("sampler", r.sampler);
  choose("checkpoint", r.model);
  $("hires").checked = Boolean(r.hires_fix);
  $("faces").checked = Boolean(r.use_face_restoration);
  const sizes = new Set(r.sizes || []);
  document.querySelectorAll("#named-size-list input").forEach((box) => { box.checked = sizes.has(box.value); });
  applicable();
}

// --- following a job ---------------------------------------------------------------------------------------

// The job being followed: { id, abort, failures, lastEvent, state }. Following another job (or forgetting the token)
// replaces it; each loop that follows one stops as soon as it is no longer current.
let current = null;
let shownState = "idle";

function syncButtons() {
  $("generate").disabled = Boolean(current);
  $("cancel").disabled = !current || Boolean(current.cancelling);
}

function showState(state, detail = "") {
  const status = $("status");
  shownState = state;
  status.dataset.state = state;
  delete status.dataset.connection;
  status.textContent = detail ? `${STATE_TEXT[state] || state}: ${detail}` : STATE_TEXT[state] || state;
  syncButtons();
}

// Neither the stream nor a poll got through: the job goes on at the service, so it keeps its state and is asked
// about again; only the service ever says that it failed.
function showConnectionLost(error, seconds) {
  const status = $("status");
  status.dataset.connection = "lost";
  status.textContent = `${STATE_TEXT[shownState] || shownState}: connection lost (${error.message}), `
    + `retrying in ${seconds} s…`;
}

// An answer came: the "connection lost" note goes. `reset` (not for a stream until it brings an event, so that
// a stream that keeps closing at once is not reopened at once) starts the backoff again from its shortest wait.
function connected(me, { reset = true } = {}) {
  if (reset) me.failures = 0;
  if ($("status").dataset.connection) showState(shownState);
}

async function waitToRetry(me, error) {
  me.failures += 1;
  const ms = error.retryAfter !== null && error.retryAfter !== undefined
    ? Math.min(error.retryAfter * 1000, 60000)
    : Math.min(RETRY_MS * 2 ** (me.failures - 1), RETRY_MAX_MS);
  showConnectionLost(error, Math.ceil(ms / 1000));
  await sleep(ms);
}

// fn() again and again while the service cannot be reached or answers 429 or 5xx; any other error is thrown.
async function persist(me, fn) {
  for (;;) {
    try {
      const out = await fn();
      connected(me);
      return out;
    } catch (error) {
      if (!retryable(error) || current !== me) throw error;
      await waitToRetry(me, error);
      if (current !== me) throw new DOMException("no longer followed", "AbortError");
    }
  }
}

function showProgress(percent, detail) {
  const bar = $("progress");
  bar.value = Math.max(0, Math.min(100, Math.round(percent)));
  bar.textContent = `${bar.value} %`;
  $("progress-detail").textContent = detail || "";
}

// The preview is a small JPEG (64 × 64 for a 512² job): shown at the size and aspect the job's image will have.
function sizePreview(request) {
  const preview = $("preview-figure");
  const r = request || {};
  const width = r.hires_fix ? 1536 : r.width;
  const height = r.hires_fix ? 1536 : r.height;
  if (width && height) {
    preview.style.setProperty("--width", `${width}px`);
    preview.style.setProperty("--ratio", `${width / height}`);
    preview.classList.add("sized");
  } else {
    preview.classList.remove("sized");
  }
}

function showPreview(uri) {
  $("preview").src = uri;
  $("preview-figure").hidden = false;
}

function resultImages(job) {
  // The job's view by URL (?images=false): a text2img or /generate job lists its images' URLs (with the safety
  // checker's flags beside them); a batch has one entry per named size, each with its URL.
  const result = job.result || {};
  const flags = Array.isArray(result.nsfw) ? result.nsfw : [];
  if (Array.isArray(result.urls)) {
    return result.urls.map((url, i) => ({ url, name: `${job.id}_${i}.png`, flagged: flags[i] === true,
      number: result.urls.length > 1 ? `image ${i + 1} of ${result.urls.length}` : "" }));
  }
  return Object.entries(job.images || result.images || {}).map(([size, entry]) => ({
    url: entry.url, name: `${job.id}_${size}.png`, label: `${size} ${entry.width} × ${entry.height}`,
    flagged: entry.nsfw === true,
  }));
}

// How an image is named to someone who cannot see it: its prompt (truncated), and which of the job's images.
function imageText(job, image) {
  const prompt = job.request && job.request.prompt ? `“${truncate(job.request.prompt)}”` : job.id;
  return [prompt, image.label, image.number].filter(Boolean).join(", ");
}

// Images come by URL, fetched with the token (an <img> cannot send one) and cached by the browser (their URLs never
// change), then shown from object URLs; each list (the result, the gallery) lets go of its old ones when redrawn.
const objectUrls = { result: [], gallery: [] };

function release(list) {
  objectUrls[list].forEach((uri) => URL.revokeObjectURL(uri));
  objectUrls[list] = [];
}

async function fetchImage(url, list) {
  const response = await send(url, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, null);
  const uri = URL.createObjectURL(await response.blob());
  objectUrls[list].push(uri);
  return uri;
}

const UNREADABLE = "image unavailable";

function showResult(job) {
  const box = $("result");
  release("result");
  box.replaceChildren();
  const seed = job.result && job.result.seed !== undefined ? job.result.seed : job.seed;
  for (const image of resultImages(job)) {
    const text = imageText(job, image);
    const caption = el("figcaption", {}, el("span", { text: `${image.label || ""} seed ${seed}`.trim() }), " ",
      image.flagged ? el("span", { class: "flagged", text: "flagged by the safety checker: replaced" }) : null);
    const figure = el("figure", { class: "result" }, el("p", { class: "loading", text: "loading…" }), caption);
    box.append(figure);
    (image.url ? fetchImage(image.url, "result") : Promise.reject(new Error("no URL")))
      .then((uri) => {
        figure.firstChild.replaceWith(el("img", { src: uri, alt: `Result: ${text}`, class: "result-image" }));
        caption.append(" ", download(uri, image.name, text));
      })
      .catch(() => figure.firstChild.replaceWith(el("p", { class: "unreadable", text: UNREADABLE })));
  }
  const warnings = (job.result && job.result.warnings) || job.warnings || [];
  if (warnings.length) {
    box.append(el("ul", { class: "warnings", "aria-label": "Warnings" }, ...warnings.map((text) => el("li", { text }))));
  }
  $("preview-figure").hidden = true;
}

function stopFollowing() {
  if (current) current.abort.abort();
  current = null;
  syncButtons();
}

// Focus is not left on a button that has just been disabled: Cancel while a job runs, Generate once it ends.
function moveFocus(from, to) {
  const active = document.activeElement;
  if (!active || active === document.body || active === $(from) || active.disabled) $(to).focus();
}

async function finish(me, end) {
  if (current !== me) return;
  if (end.state === "completed") {
    showProgress(100, "");
    // The view by URL: the images come one by one. A poll has just read it; a stream's end reads it once.
    const job = end.view || await persist(me, () => api(`jobs/${me.id}?images=false`, { signal: me.abort.signal }));
    if (current !== me) return;
    showResult(job);
    showState("completed", job.result && job.result.timeTaken ? `${(job.result.timeTaken / 1000).toFixed(1)} s` : "");
  } else {
    // A polled job says why in "error"; the stream's failed event in "code" and "message".
    const data = end.data;
    const reason = data && (data.error || (data.code ? `${data.code}: ${data.message || ""}` : ""));
    showState(end.state, reason && reason !== "cancelled" ? reason : "");
  }
  current = null;
  sessionStorage.removeItem(JOB_KEY);
  syncButtons();
  moveFocus("cancel", "generate");
  refreshGallery();
}

// The job cannot be followed any more for a reason retrying will not mend (it is unknown here, the token is refused).
function lose(me, error) {
  if (current !== me) return;
  current = null;
  if (error.status !== 401) sessionStorage.removeItem(JOB_KEY); // a saved token resumes it
  showState("unknown", error.message);
  moveFocus("cancel", "generate");
}

function parseEvents(buffer, onEvent) {
  // Server-sent events: blocks separated by a blank line, "id:", "event:" and "data:" fields, ":" comments.
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  for (const block of blocks) {
    let name = "message";
    let id = null;
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (data.length) onEvent(name, JSON.parse(data.join("\n")), id);
  }
  return rest;
}

class NoStream extends Error {} // the service answered, but not with a stream: poll instead

// EventSource cannot send the bearer token (and jobs belong to the token that made them), so the stream is read
// with fetch; it is the same text/event-stream. A reconnection sends Last-Event-ID, so nothing is replayed.
// Resolves with the terminal event; rejects when the stream cannot be had or breaks off.
async function streamEvents(me) {
  const headers = { Accept: "text/event-stream", ...authHeaders() };
  if (me.lastEvent) headers["Last-Event-ID"] = me.lastEvent;
  const response = await send(`jobs/${me.id}/events`, { headers, signal: me.abort.signal });
  const type = response.headers.get("content-type") || "";
  if (!response.ok || !type.startsWith("text/event-stream")) {
    const body = await response.json().catch(() => null);
    if (response.status === 401) needToken();
    if ([401, 403, 404, 410].includes(response.status)) throw new ApiError(response.status, body);
    throw new NoStream(`no event stream (${response.status})`);
  }
  connected(me, { reset: false });
  document.body.dataset.updates = "events";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let terminal = null;
  const onEvent = (name, data, id) => {
    me.failures = 0;
    if (id) me.lastEvent = id;
    if (name === "progress") {
      showState("processing");
      const eta = data.eta_s !== undefined && data.eta_s !== null ? `, about ${Math.ceil(data.eta_s)} s left` : "";
      showProgress(data.total ? (100 * data.step) / data.total : 0, `step ${data.step} of ${data.total}${eta}`);
    } else if (name === "preview") {
      showPreview(dataUri(data.image, "image/jpeg"));
    } else if (name === "queued") {
      showState("queued", data.position ? `position ${data.position} in the queue` : "");
    } else if (name === "started") {
      showState("processing");
    } else if (TERMINAL.has(name)) {
      terminal = { state: name, data };
    }
  };
  try {
    while (!terminal) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + value, onEvent);
    }
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, null); // the connection broke mid-stream
  } finally {
    reader.cancel().catch(() => {});
  }
  if (!terminal) throw new ApiError(0, null); // the stream ended before the job did: reconnect
  return terminal;
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Polling fallback: GET /jobs/{id} (its view by URL); while it runs, A1111's /progress lends a preview of the
// caller's running job.
async function poll(me) {
  document.body.dataset.updates = "polling";
  for (let tick = 0; current === me; tick += 1) {
    const job = await api(`jobs/${me.id}?images=false`, { signal: me.abort.signal });
    connected(me);
    if (TERMINAL.has(job.status)) return { state: job.status, data: job, view: job };
    showState(job.status);
    showProgress(job.progress, job.status === "processing" ? `${job.progress} %` : "");
    if (job.status === "processing" && tick % 2 === 0) {
      const progress = await api("sdapi/v1/progress", { signal: me.abort.signal }).catch(() => null);
      if (current === me && progress && progress.state.job === me.id && progress.current_image) {
        showPreview(dataUri(progress.current_image, "image/png"));
      }
    }
    await sleep(POLL_MS);
  }
  return null;
}

// Follows job `id` until it ends: its event stream, else polling; through lost connections, 429s and 5xx, with
// backoff. `request` sizes the preview; `restore` (a reload, Follow) first reads the job's view and fills the form.
async function follow(id, { request, restore = false } = {}) {
  stopFollowing();
  const me = { id, abort: new AbortController(), failures: 0, lastEvent: null };
  current = me;
  sessionStorage.setItem(JOB_KEY, id);
  $("status").dataset.job = id;
  showState("queued");
  showProgress(0, "");
  release("result");
  $("result").replaceChildren();
  $("preview-figure").hidden = true;
  if (!restore) moveFocus("generate", "cancel");
  let polling = false;
  let end = null;
  try {
    if (restore) {
      const view = await persist(me, () => api(`jobs/${id}?images=false`, { signal: me.abort.signal }));
      restoreForm(view.request);
      request = view.request;
      if (TERMINAL.has(view.status)) end = { state: view.status, data: view, view };
      else showState(view.status);
    }
    sizePreview(request);
    while (!end && current === me) {
      try {
        end = polling ? await poll(me) : await streamEvents(me);
      } catch (error) {
        if (error instanceof NoStream) polling = true; // no stream (yet): the job itself is still there
        else if (retryable(error) && current === me) await waitToRetry(me, error);
        else throw error;
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") lose(me, error);
    return;
  }
  if (end) await finish(me, end).catch((error) => { if (error.name !== "AbortError") lose(me, error); });
}

// After a reload (or a token saved), the job this tab was following, if any.
function resume() {
  const id = sessionStorage.getItem(JOB_KEY);
  if (id && !current) follow(id, { restore: true });
}

async function onGenerate(event) {
  event.preventDefault();
  if (current) return; // Ctrl+Enter while a job runs
  $("form-error").textContent = "";
  clearInvalid($("generate-form"));
  let accepted;
  let planned;
  try {
    planned = plan();
    $("generate").disabled = true;
    accepted = await api(planned.path, { method: "POST", body: planned.body });
  } catch (error) {
    $("form-error").textContent = error.message;
    const control = error instanceof ApiError && controlFor(error.field);
    if (control) markInvalid(control, error.message);
    syncButtons();
    if (!(error instanceof FieldError) && !control) $("generate").focus();
    return;
  }
  follow(accepted.jobId || accepted.id, { request: planned.body });
}

async function onCancel() {
  if (!current) return;
  const me = current;
  me.cancelling = true;
  syncButtons();
  moveFocus("cancel", "generate");
  try {
    await api(`jobs/${me.id}/cancel`, { method: "POST" });
    // The stream (or the next poll) reports the cancellation; a job that finished first reports that instead.
  } catch (error) {
    $("form-error").textContent = `Cancel: ${error.message}`;
    me.cancelling = false;
    syncButtons();
  }
}

// --- gallery -----------------------------------------------------------------------------------------------

function describe(job) {
  const r = job.request || {};
  const parts = [
    r.width && r.height ? `${r.width} × ${r.height}` : null,
    r.sizes ? `sizes ${r.sizes.join(", ")}` : null,
    r.steps || r.num_inference_steps ? `${r.steps || r.num_inference_steps} steps` : null,
    r.sampler ? r.sampler : null,
    r.guidanceScale !== undefined || r.guidance_scale !== undefined ? `guidance ${r.guidanceScale ?? r.guidance_scale}` : null,
    r.hires_fix ? "hires fix" : null,
    r.use_face_restoration ? "faces restored" : null,
    job.result && job.result.seed !== undefined ? `seed ${job.result.seed}` : job.seed !== undefined ? `seed ${job.seed}` : null,
  ];
  return parts.filter(Boolean).join(" · ");
}

function when(iso) {
  if (!iso) return null;
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? null : el("time", { datetime: iso, text: date.toLocaleString() });
}

function galleryFigure(job, image) {
  const figure = el("figure", {});
  const text = imageText(job, image);
  fetchImage(image.url, "gallery")
    .then((uri) => figure.replaceChildren(el("img", { src: uri, alt: text }),
      el("figcaption", {}, download(uri, image.name, text))))
    .catch(() => figure.replaceChildren(el("p", { class: "unreadable", text: UNREADABLE })));
  return figure;
}

function galleryActions(job) {
  if (TERMINAL.has(job.status)) return null;
  const followed = current && current.id === job.id;
  const follows = el("button", { type: "button", class: "follow", disabled: followed,
    text: followed ? "Following" : "Follow", "aria-label": `Follow job ${job.id} as the current job` });
  follows.addEventListener("click", () => follow(job.id, { restore: true }));
  const cancel = el("button", { type: "button", class: "cancel-job", text: "Cancel",
    "aria-label": `Cancel job ${job.id}` });
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api(`jobs/${job.id}/cancel`, { method: "POST" });
    } catch (error) {
      $("gallery-note").textContent = `Could not cancel ${job.id}: ${error.message}`;
    }
    refreshGallery();
  });
  return el("p", { class: "actions" }, follows, " ", cancel);
}

let galleryTimer = null;
let galleryRound = 0;
let galleryBackoff = GALLERY_MS; // doubles while the list cannot be read, back to GALLERY_MS once it can

async function refreshGallery() {
  clearTimeout(galleryTimer);
  const round = ++galleryRound; // a slower, older read never replaces a newer one
  const list = $("gallery");
  try {
    const { jobs } = await api("jobs?limit=12");
    // Settled one by one: a job whose details cannot be read now is listed as the listing gave it, not in place
    // of the whole list. Its images come by URL, not as bytes inside its view.
    const settled = await Promise.allSettled(jobs.map((j) => api(`jobs/${j.id}?images=false`)));
    if (round !== galleryRound) return;
    release("gallery");
    const shown = settled.map((outcome, i) => (outcome.status === "fulfilled" ? outcome.value : jobs[i]));
    list.replaceChildren(...shown.map((job, i) => {
      const r = job.request || {};
      const reason = settled[i].status === "rejected" ? settled[i].reason : null;
      return el("li", { class: "job", "data-job": job.id, "data-status": job.status },
        el("p", {}, el("strong", { text: STATE_TEXT[job.status] || job.status }), ` ${job.type} · `,
          when(job.createdAt)),
        r.prompt ? el("p", { class: "prompt", title: r.prompt, text: truncate(r.prompt, 140) }) : null,
        job.status === "failed" && job.error ? el("p", { class: "job-error", text: job.error }) : null,
        el("p", { class: "hint", text: describe(job) }),
        reason ? el("p", { class: "unreadable", text: `Details unavailable: ${reason.message}` }) : null,
        galleryActions(job),
        ...resultImages(job).map((image) => galleryFigure(job, image)));
    }));
    galleryBackoff = GALLERY_MS;
    $("gallery-note").textContent = jobs.length ? "" : "No jobs yet.";
    // Unfinished jobs are read again until they end, so that the list shows how they did.
    if (shown.some((job) => !TERMINAL.has(job.status))) galleryTimer = setTimeout(refreshGallery, GALLERY_MS);
  } catch (error) {
    if (round !== galleryRound) return;
    $("gallery-note").textContent = `Could not list jobs: ${error.message}`;
    // Only a list that still shows unfinished jobs is worth reading again, less often each time it fails.
    if (retryable(error) && list.querySelector("li[data-status=queued], li[data-status=processing]")) {
      galleryTimer = setTimeout(refreshGallery, galleryBackoff);
      galleryBackoff = Math.min(galleryBackoff * 2, 60000);
    }
  }
}

// --- tools -------------------------------------------------------------------------------------------------

function readImage() {
  const file = $("tool-image").files[0];
  if (!file) {
    $("tool-image").focus();
    return Promise.reject(new Error("Image: choose a file first"));
  }
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ uri: reader.result, stem: file.name.replace(/\.[^.]*$/, "") });
    reader.onerror = () => reject(new Error("Image: the file could not be read"));
    reader.readAsDataURL(file);
  });
}

function toolResult(uri, name, label) {
  return el("figure", { class: "tool-result" },
    el("img", { src: uri, alt: label }),
    el("figcaption", {}, el("span", { text: label }), " ", download(uri, name)));
}

async function runTool(button, label, work) {
  $("tool-error").textContent = "";
  clearInvalid($("tools-form"));
  $("tool-status").textContent = `${label}…`;
  button.disabled = true;
  try {
    const { uri, stem } = await readImage();
    const figures = await work(uri, stem);
    $("tool-output").replaceChildren(...figures);
    $("tool-status").textContent = `${label}: done`;
  } catch (error) {
    $("tool-status").textContent = "";
    $("tool-error").textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

function setupTools() {
  $("tool-upscale").addEventListener("click", (event) => runTool(event.target, "Upscale", async (uri, stem) => {
    const factor = Number($("upscale-factor").value);
    const out = await api("sdapi/v1/extra-single-image", { method: "POST", body: {
      image: uri, upscaler_1: $("upscaler").value || "Lanczos", upscaling_resize: factor } });
    return [toolResult(dataUri(out.image, "image/png"), `${stem}_x${factor}.png`, `Upscaled × ${factor}`)];
  }));
  $("tool-faces").addEventListener("click", (event) => runTool(event.target, "Restore faces", async (uri, stem) => {
    const out = await api("sdapi/v1/extra-single-image", { method: "POST", body: {
      image: uri, upscaler_1: "None", upscaling_resize: 1, codeformer_visibility: 1,
      codeformer_weight: number("face-weight") } });
    // html_info carries what the service says about the run (A1111 sends ""); a face restorer that found no face
    // returns the image unchanged and says so there.
    const info = new DOMParser().parseFromString(out.html_info || "", "text/html").body.textContent.trim();
    const label = /no face/i.test(info) ? "No face found: image unchanged"
      : info ? `Faces restored (${info})` : "Faces restored where a face was detected";
    return [toolResult(dataUri(out.image, "image/png"), `${stem}_faces.png`, label)];
  }));
  $("tool-crops").addEventListener("click", (event) => runTool(event.target, "Focal crops", async (uri, stem) => {
    const sizes = $("crop-sizes").value.split(",").map((s) => s.trim().replace("×", "x")).filter(Boolean);
    const out = await api("derivatives/clip-focal", { method: "POST", body: { image: uri, sizes, format: "png" } });
    return out.derivatives.map((d) => toolResult(dataUri(d.imageData, "image/png"), `${stem}_${d.name}.png`,
      `${d.name} around (${Math.round(out.focalPoint.x)}, ${Math.round(out.focalPoint.y)}) ${out.focalPoint.source}`));
  }));
}

function setupKeys() {
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate-form").requestSubmit();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  setupSizes();
  setupLora();
  setupTools();
  setupKeys();
  for (const id of ["hires", "faces"]) $(id).addEventListener("change", applicable);
  $("generate-form").addEventListener("input", (event) => {
    if (event.target.hasAttribute("aria-invalid")) clearInvalid(event.target.closest(".field") || document);
  });
  $("generate-form").addEventListener("submit", onGenerate);
  $("cancel").addEventListener("click", onCancel);
  $("gallery-refresh").addEventListener("click", refreshGallery);
  loadChoices().then(resume); // the form's choices first: a resumed job's settings are chosen among them
  refreshGallery();
});
