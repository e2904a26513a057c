// The /ui page: a plain client of the service's public API, no framework and no build step.
// Every URL is relative, so the page also works when the application is served under a route prefix.
"use strict";

const TOKEN_KEY = "imagegen.token";
const POLL_MS = 500;
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const STATE_TEXT = {
  queued: "Queued",
  processing: "Running",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

const $ = (id) => document.getElementById(id);

// --- calling the API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const message = body && body.error ? body.error : `HTTP ${status}`;
    super(body && body.details && body.details.field ? `${message} (${body.details.field})` : message);
    this.status = status;
    this.code = body && body.code;
  }
}

function authHeaders() {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (response.status === 401) showAccess("The token was refused: enter the service's bearer token.");
  if (!response.ok) throw new ApiError(response.status, data);
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

function download(uri, name) {
  return el("a", { href: uri, download: name, text: `Download ${name}` });
}

// --- access token ------------------------------------------------------------------------------------------

function showAccess(note) {
  $("access").hidden = false;
  if (note) $("access-note").textContent = note;
}

function setupToken() {
  const stored = localStorage.getItem(TOKEN_KEY);
  if (stored) {
    $("token").value = stored;
    showAccess();
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
    $("access-note").textContent = token ? "Token saved in this browser." : "No token saved.";
    loadChoices();
    refreshGallery();
  });
  $("token-forget").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    $("access-note").textContent = "Token forgotten.";
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
  $("named-sizes-note").textContent = "Tick any to render them all from one base per aspect instead of the size above.";
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
    showAccess("This service asks for a bearer token. It is kept in this browser only.");
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
  const track = () => {
    const value = `${$("width").value}x${$("height").value}`;
    preset.value = [...preset.options].some((o) => o.value === value) ? value : "custom";
  };
  $("width").addEventListener("input", track);
  $("height").addEventListener("input", track);
}

function setupLora() {
  $("lora-add").addEventListener("click", () => {
    const name = $("lora").value;
    if (!name) return;
    const weight = Number($("lora-weight").value || 1);
    const prompt = $("prompt");
    prompt.value = `${prompt.value.trim()} <lora:${name}:${weight}>`.trim();
  });
}

function number(id) {
  const input = $(id);
  if (!input.checkValidity() || input.value === "") {
    input.focus();
    throw new Error(`${input.labels[0].textContent}: ${input.validationMessage || "a number is needed"}`);
  }
  return Number(input.value);
}

// Which job route fits the form: a named-size batch (seed 002), seed 000's plan for hires fix and face
// restoration (queued through /generate/async), otherwise seed 003's text2img with its sampler. Each takes the
// checkpoint (`model`; none: the service's default).
function plan() {
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    $("prompt").focus();
    throw new Error("Prompt: describe the image to generate");
  }
  const negative = $("negative-prompt").value.trim();
  const common = { steps: number("steps"), guidance: number("guidance"), seed: number("seed") };
  const model = $("checkpoint").value || undefined; // JSON.stringify leaves an undefined field out
  const sizes = [...document.querySelectorAll("#named-size-list input:checked")].map((i) => i.value);
  if (sizes.length) {
    return { path: "generate/batch-sizes", body: { prompt, negativePrompt: negative, sizes, seed: common.seed,
      steps: common.steps, guidanceScale: common.guidance, model } };
  }
  const width = number("width");
  const height = number("height");
  if ($("hires").checked || $("faces").checked) {
    return { path: "generate/async", body: { prompt, negative_prompt: negative, width, height,
      num_inference_steps: common.steps, guidance_scale: common.guidance, seed: common.seed,
      hires_fix: $("hires").checked, use_face_restoration: $("faces").checked, model } };
  }
  const body = { prompt, negativePrompt: negative, width, height, steps: common.steps,
    guidanceScale: common.guidance, seed: common.seed, sampler: $("sampler").value || "euler_a", model };
  return { path: "generate/text2img", body };
}

// --- following a job ---------------------------------------------------------------------------------------

let current = null; // { id } of the job being followed

function showState(state, detail = "") {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = detail ? `${STATE_TEXT[state] || state}: ${detail}` : STATE_TEXT[state] || state;
  $("cancel").disabled = !current || TERMINAL.has(state);
  $("generate").disabled = Boolean(current) && !TERMINAL.has(state);
}

function showProgress(percent, detail) {
  const bar = $("progress");
  bar.value = Math.max(0, Math.min(100, Math.round(percent)));
  bar.textContent = `${bar.value} %`;
  $("progress-detail").textContent = detail || "";
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
    return result.urls.map((url, i) => ({ url, name: `${job.id}_${i}.png`, flagged: flags[i] === true }));
  }
  return Object.entries(job.images || result.images || {}).map(([size, entry]) => ({
    url: entry.url, name: `${job.id}_${size}.png`, label: `${size} ${entry.width} × ${entry.height}`,
    flagged: entry.nsfw === true,
  }));
}

// Images come by URL, fetched with the token (an <img> cannot send one) and cached by the browser (their URLs never
// change), then shown from object URLs; each list (the result, the gallery) lets go of its old ones when redrawn.
const objectUrls = { result: [], gallery: [] };

function release(list) {
  objectUrls[list].forEach((uri) => URL.revokeObjectURL(uri));
  objectUrls[list] = [];
}

async function fetchImage(url, list) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new Error(response.statusText || `HTTP ${response.status}`);
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
    const alt = `Result of ${job.id}${image.label ? `, ${image.label}` : ""}`;
    const caption = el("figcaption", {}, el("span", { text: `${image.label || ""} seed ${seed}`.trim() }), " ",
      image.flagged ? el("span", { class: "flagged", text: "flagged by the safety checker: replaced" }) : null);
    const figure = el("figure", { class: "result" }, el("p", { class: "loading", text: "loading…" }), caption);
    box.append(figure);
    (image.url ? fetchImage(image.url, "result") : Promise.reject(new Error("no URL")))
      .then((uri) => {
        figure.firstChild.replaceWith(el("img", { src: uri, alt, class: "result-image" }));
        caption.append(" ", download(uri, image.name));
      })
      .catch(() => figure.firstChild.replaceWith(el("p", { class: "unreadable", text: UNREADABLE })));
  }
  const warnings = (job.result && job.result.warnings) || job.warnings || [];
  if (warnings.length) {
    box.append(el("ul", { class: "warnings", "aria-label": "Warnings" }, ...warnings.map((text) => el("li", { text }))));
  }
  $("preview-figure").hidden = true;
}

async function finish(id, state, data) {
  if (!current || current.id !== id) return;
  if (state === "completed") {
    showProgress(100, "");
    const job = await api(`jobs/${id}?images=false`); // the view by URL: the images come one by one
    showResult(job);
    showState("completed", job.result && job.result.timeTaken ? `${(job.result.timeTaken / 1000).toFixed(1)} s` : "");
  } else {
    // A polled job says why in "error"; the stream's failed event in "code" and "message".
    const reason = data && (data.error || (data.code ? `${data.code}: ${data.message || ""}` : ""));
    showState(state, reason && reason !== "cancelled" ? reason : "");
  }
  current = null;
  $("cancel").disabled = true;
  $("generate").disabled = false;
  refreshGallery();
}

function parseEvents(buffer, onEvent) {
  // Server-sent events: blocks separated by a blank line, "event:" and "data:" fields, ":" comments.
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  for (const block of blocks) {
    let name = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) onEvent(name, JSON.parse(data.join("\n")));
  }
  return rest;
}

// EventSource cannot send the bearer token (and jobs belong to the token that made them), so the stream is read
// with fetch; it is the same text/event-stream. Resolves with the terminal event, rejects when the stream fails.
async function streamEvents(id) {
  const response = await fetch(`jobs/${id}/events`, { headers: { Accept: "text/event-stream", ...authHeaders() } });
  const type = response.headers.get("content-type") || "";
  if (!response.ok || !type.startsWith("text/event-stream")) throw new Error(`no event stream (${response.status})`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let terminal = null;
  const onEvent = (name, data) => {
    if (name === "progress") {
      showState("processing");
      const eta = data.eta_s !== undefined && data.eta_s !== null ? `, about ${Math.ceil(data.eta_s)} s left` : "";
      showProgress(data.total ? (100 * data.step) / data.total : 0, `step ${data.step} of ${data.total}${eta}`);
    } else if (name === "preview") {
      showPreview(dataUri(data.image, "image/jpeg"));
    } else if (name === "queued" || name === "started") {
      showState(name === "started" ? "processing" : "queued");
    } else if (TERMINAL.has(name)) {
      terminal = { state: name, data };
    }
  };
  while (!terminal) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer = parseEvents(buffer + value, onEvent);
  }
  reader.cancel().catch(() => {});
  if (!terminal) throw new Error("event stream ended early");
  return terminal;
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Polling fallback: GET /jobs/{id}; while it runs, A1111's /progress lends a preview of the caller's running job.
async function poll(id) {
  for (let tick = 0; ; tick += 1) {
    const job = await api(`jobs/${id}`);
    if (TERMINAL.has(job.status)) return { state: job.status, data: job };
    showState(job.status);
    showProgress(job.progress, job.status === "processing" ? `${job.progress} %` : "");
    if (job.status === "processing" && tick % 2 === 0) {
      const progress = await api("sdapi/v1/progress").catch(() => null);
      if (progress && progress.state.job === id && progress.current_image) {
        showPreview(dataUri(progress.current_image, "image/png"));
      }
    }
    await sleep(POLL_MS);
  }
}

async function follow(id) {
  current = { id };
  $("status").dataset.job = id;
  showState("queued");
  showProgress(0, "");
  $("result").replaceChildren();
  $("preview-figure").hidden = true;
  let end;
  try {
    end = await streamEvents(id);
    document.body.dataset.updates = "events";
  } catch {
    document.body.dataset.updates = "polling"; // no stream (yet), or it broke: the job itself is still there
    end = await poll(id);
  }
  await finish(id, end.state, end.data);
}

async function onGenerate(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  try {
    const { path, body } = plan();
    $("generate").disabled = true;
    const accepted = await api(path, { method: "POST", body });
    await follow(accepted.jobId || accepted.id);
  } catch (error) {
    $("form-error").textContent = error.message;
    if (current) showState("failed", error.message);
    current = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function onCancel() {
  if (!current) return;
  const { id } = current;
  $("cancel").disabled = true;
  try {
    await api(`jobs/${id}/cancel`, { method: "POST" });
    // The stream (or the next poll) reports the cancellation; a job that finished first reports that instead.
  } catch (error) {
    $("form-error").textContent = error.message;
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

function galleryFigure(job, image) {
  const figure = el("figure", {});
  fetchImage(image.url, "gallery")
    .then((uri) => figure.replaceChildren(el("img", { src: uri, alt: `${job.id} ${image.label || ""}`.trim() }),
      el("figcaption", {}, download(uri, image.name))))
    .catch(() => figure.replaceChildren(el("p", { class: "unreadable", text: UNREADABLE })));
  return figure;
}

async function refreshGallery() {
  const list = $("gallery");
  try {
    const { jobs } = await api("jobs?limit=12");
    // Settled one by one: a job whose details cannot be read now is listed as the listing gave it, not in place
    // of the whole list. Its images come by URL, not as bytes inside its view.
    const settled = await Promise.allSettled(jobs.map((j) => (
      j.status === "completed" ? api(`jobs/${j.id}?images=false`) : j)));
    release("gallery");
    list.replaceChildren(...settled.map((outcome, i) => {
      const job = outcome.status === "fulfilled" ? outcome.value : jobs[i];
      const r = job.request || {};
      return el("li", { class: "job", "data-job": job.id },
        el("p", {}, el("strong", { text: STATE_TEXT[job.status] || job.status }), ` ${job.type} · ${job.createdAt || ""}`),
        r.prompt ? el("p", { class: "prompt", text: r.prompt }) : null,
        el("p", { class: "hint", text: describe(job) }),
        outcome.status === "rejected"
          ? el("p", { class: "unreadable", text: `Details unavailable: ${outcome.reason.message}` }) : null,
        ...resultImages(job).map((image) => galleryFigure(job, image)));
    }));
    $("gallery-note").textContent = jobs.length ? "" : "No jobs yet.";
  } catch (error) {
    $("gallery-note").textContent = `Could not list jobs: ${error.message}`;
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
    return [toolResult(dataUri(out.image, "image/png"), `${stem}_faces.png`, "Faces restored")];
  }));
  $("tool-crops").addEventListener("click", (event) => runTool(event.target, "Focal crops", async (uri, stem) => {
    const sizes = $("crop-sizes").value.split(",").map((s) => s.trim().replace("×", "x")).filter(Boolean);
    const out = await api("derivatives/clip-focal", { method: "POST", body: { image: uri, sizes, format: "png" } });
    return out.derivatives.map((d) => toolResult(dataUri(d.imageData, "image/png"), `${stem}_${d.name}.png`,
      `${d.name} around (${Math.round(out.focalPoint.x)}, ${Math.round(out.focalPoint.y)}) ${out.focalPoint.source}`));
  }));
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  setupSizes();
  setupLora();
  setupTools();
  $("generate-form").addEventListener("submit", onGenerate);
  $("cancel").addEventListener("click", onCancel);
  $("gallery-refresh").addEventListener("click", refreshGallery);
  loadChoices();
  refreshGallery();
});
