"use strict";
// The playground: the form -> POST /v1/generate with "stream": true -> progress, previews and
// the images. Everything it needs comes from this server: the model from /health/ready, its
// limits and defaults from /openapi.json (filled in once the model has loaded).

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "cascade-playground-api-key";
const PREVIEW_EVERY = 2; // Stage C steps between previews
// The numeric form fields, by their GenerateRequest names (the inputs have the same ids).
const NUMBERS = ["width", "height", "prior_steps", "prior_guidance_scale", "seed", "num_images"];

let previews = true; // the model has a Previewer (else asking for previews earns a warning)
let decoderSteps = 10; // Stage B steps until the stream says (the schema's default replaces it)
let run = null; // the generation in progress: {controller, id, cancelled, prompt}

// --- Server configuration ------------------------------------------------------------------

async function loadConfig() {
  let health;
  for (;;) {
    try {
      const response = await fetch("/health/ready");
      health = await response.json();
      if (response.ok) break;
      $("model").textContent = `Server ${health.status}: waiting for the model to load…`;
    } catch (error) {
      $("model").textContent = `Cannot reach the server (${error.message}); retrying…`;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
  const model = health.model || {};
  $("model").textContent = `Model: ${model.name || "unknown"}` +
    (model.device ? ` on ${model.device}` : "");
  $("demo-notice").hidden = !health.demo_weights;
  previews = model.previews !== false;
  try {
    const response = await fetch("/openapi.json");
    applySchema(await response.json());
  } catch {
    // Without the schema the form still works: blank fields take the model's defaults.
  }
}

function applySchema(doc) {
  const schemas = (doc.components && doc.components.schemas) || {};
  const fields = (schemas.GenerateRequest || {}).properties || {};
  for (const name of NUMBERS) {
    const field = fields[name];
    if (!field) continue;
    // Optional fields are {anyOf: [{type: integer, minimum, ...}, {type: null}], default}.
    const branch = (field.anyOf || [field]).find((b) => b.type !== "null") || {};
    const input = $(name);
    if (branch.minimum !== undefined) input.min = branch.minimum;
    if (branch.maximum !== undefined) input.max = branch.maximum;
    if (branch.multipleOf !== undefined) input.step = branch.multipleOf;
    if (field.default !== undefined && field.default !== null && name !== "seed") {
      input.value = field.default;
    }
  }
  const decoder = fields.decoder_steps;
  if (decoder && typeof decoder.default === "number") decoderSteps = decoder.default;
  // Another way to learn that keys are on; a 401 shows the field too.
  if (Object.keys((doc.components && doc.components.securitySchemes) || {}).length) {
    $("key-row").hidden = false;
  }
}

// --- One generation ----------------------------------------------------------------------

function requestBody() {
  const body = { prompt: $("prompt").value };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  for (const name of NUMBERS) {
    const text = $(name).value.trim();
    if (text !== "") body[name] = Number(text); // blank: the model's default (seed: random)
  }
  return { ...body, stream: true, ...(previews ? { preview_every: PREVIEW_EVERY } : {}) };
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function generate(event) {
  event.preventDefault();
  if (run) return;
  const prompt = $("prompt").value;
  run = { controller: new AbortController(), id: null, cancelled: false, prompt };
  setRunning(true);
  try {
    const response = await fetch("/v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()),
      signal: run.controller.signal,
    });
    if (!response.ok) {
      await showHttpError(response); // refused before the stream began: a JSON error
      return;
    }
    showRequestId(response.headers.get("X-Request-ID"));
    const totals = { prior: null, decoder: decoderSteps };
    let ended = false; // a result or an error event: the stream's last
    for await (const data of readEvents(response.body)) ended = handleEvent(data, totals) || ended;
    if (!ended && !run.cancelled) showError("The stream ended before the result; try again.");
  } catch (error) {
    if (!run.cancelled) showError(`Connection failed: ${error.message}`);
  } finally {
    if (run.cancelled) $("status").textContent = "Cancelled.";
    run = null;
    setRunning(false);
  }
}

// EventSource can only GET, so the stream is read with fetch() and parsed here: "field: value"
// lines until a blank line ends an event; lines starting with ":" are comments (keep-alives).
// The server puts each event's JSON on one data: line, with its type in it.
async function* readEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop(); // a line not yet complete waits for the next chunk
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "") {
        if (data.length) yield JSON.parse(data.join("\n"));
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

function handleEvent(data, totals) {
  if (data.id) showRequestId(data.id);
  switch (data.type) {
    case "queued":
      $("status").textContent = data.queue_position === 0
        ? "Queued: next in line…"
        : `Queued: ${data.queue_position} ahead…`;
      break;
    case "started":
      totals.prior = data.total;
      $("status").textContent = "Stage C…";
      break;
    case "step":
      totals[data.stage] = data.total;
      showProgress(data, totals);
      break;
    case "preview":
      showPreviews(data.images);
      break;
    case "result":
      $("progress").value = 1;
      $("status").textContent = `Done in ${data.timings.total.toFixed(1)} s.`;
      showResult(data);
      return true;
    case "error":
      if (!run.cancelled) showError(describeError(data.error, data.status));
      return true;
  }
  return false;
}

// One bar over both stages: Stage C's steps, then Stage B's (Stage A's single decode is short).
function showProgress(data, totals) {
  const prior = totals.prior || data.total;
  const done = data.stage === "prior" ? data.step : prior + data.step;
  $("progress").value = done / (prior + totals.decoder);
  const stage = data.stage === "prior" ? "Stage C" : "Stage B";
  $("status").textContent = `${stage}: step ${data.step} of ${data.total}`;
}

function showPreviews(images) {
  const box = $("previews");
  images.forEach((image, i) => {
    let img = box.children[i];
    if (!img) {
      img = box.appendChild(document.createElement("img"));
      img.alt = `Preview of image ${i + 1}`;
    }
    img.src = `data:image/png;base64,${image.b64_json}`;
  });
}

function showResult(body) {
  $("previews").replaceChildren();
  const warnings = body.warnings || [];
  $("warnings").hidden = warnings.length === 0;
  $("warnings").textContent = warnings.join(" ");
  const list = $("results");
  list.replaceChildren();
  for (const image of body.data) {
    const src = `data:image/png;base64,${image.b64_json}`;
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = src;
    img.alt = `${run.prompt} (seed ${image.seed})`;
    img.dataset.seed = image.seed;
    const actions = document.createElement("div");
    actions.className = "actions";
    const seed = document.createElement("span");
    seed.textContent = `Seed ${image.seed}`;
    const download = document.createElement("a");
    download.href = src;
    download.download = `cascade-${image.seed}.png`;
    download.textContent = "Download";
    const again = document.createElement("button");
    again.type = "button";
    again.className = "same-seed";
    again.textContent = "Same seed again";
    again.addEventListener("click", () => {
      $("seed").value = image.seed;
      $("seed").focus();
    });
    actions.append(seed, download, again);
    item.append(img, actions);
    list.append(item);
  }
}

// --- Errors, cancel and state ------------------------------------------------------------

async function showHttpError(response) {
  let error = { message: `HTTP ${response.status}` };
  try {
    error = (await response.json()).error || error;
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("api-key").focus();
  }
  const retry = response.headers.get("Retry-After");
  showError(describeError(error, response.status) + (retry ? ` Retry in ${retry} s.` : ""));
  if (error.field && NUMBERS.concat(["prompt", "negative_prompt"]).includes(error.field)) {
    $(error.field).setAttribute("aria-invalid", "true");
  }
}

function describeError(error, status) {
  const code = error.code ? ` (${error.code}${status ? `, ${status}` : ""})` : "";
  return `${error.message}${code}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function showRequestId(id) {
  if (!id) return;
  run.id = id;
  $("progress").dataset.requestId = id; // for whoever reads the logs (and the tests)
}

// DELETE answers the stream with a "cancelled" error at once; aborting the fetch alone would
// also cancel the job (the server notices the closed stream), this just says so sooner.
function cancel() {
  if (!run) return;
  run.cancelled = true;
  if (run.id) {
    fetch(`/v1/requests/${encodeURIComponent(run.id)}`, {
      method: "DELETE",
      headers: authHeaders(),
    }).catch(() => {});
  }
  run.controller.abort();
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  if (running) {
    $("error").hidden = true;
    $("status").textContent = "Sending…";
    $("progress").value = 0;
    delete $("progress").dataset.requestId;
    for (const input of document.querySelectorAll("[aria-invalid]")) {
      input.removeAttribute("aria-invalid");
    }
  }
}

function start() {
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) {
    $("api-key").value = key;
    $("key-row").hidden = false;
  }
  $("api-key").addEventListener("input", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  });
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  loadConfig();
}

start();
