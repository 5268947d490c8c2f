// opensd web page: a form that calls /sdapi/v1/txt2img or img2img (inpainting with the mask
// painted in the mask editor, mask.js), polls /sdapi/v1/progress for a live preview, and
// keeps a gallery of results; an Explain section that calls
// /opensd/v1/explain and shows one heatmap per word, the model's segmenter's map of each shape
// (with how much of the shape word's attention lies inside it) and the denoising path. The model menu lists
// /sdapi/v1/sd-models with each model's family and native size (the size used when Width and
// Height are empty); the chosen model and refiner go with each request (override_settings,
// refiner_checkpoint), so the server's current model does not change. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";
const POLL_MS = 250;

const FAMILIES = { sd1: "SD 1.x", sd2: "SD 2.x", sdxl: "SDXL", sdxl_refiner: "SDXL refiner" };

let busy = false;
let pollTimer = null;
let models = [];

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

function fillSelect(select, items, chosen) {
  select.replaceChildren(...items.map(({ value, label }) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    option.selected = value === chosen;
    return option;
  }));
}

function modelKind(m) {
  const family = FAMILIES[m.family] || "unknown family";
  return m.image_size ? `${family}, ${m.image_size}x${m.image_size}` : family;
}

function showModel() {
  const m = models.find((x) => x.title === $("model").value);
  $("model-kind").textContent = m ? modelKind(m) : "";
  const size = m && m.image_size ? `${m.image_size} (model's size)` : "model's size";
  for (const key of ["width", "height"]) $(key).placeholder = size;
}

async function loadChoices() {
  try {
    const [samplers, schedulers, options, listed] = await Promise.all([
      api(`${API}/samplers`), api(`${API}/schedulers`), api(`${API}/options`), api(`${API}/sd-models`),
    ]);
    fillSelect($("sampler_name"), samplers.map((s) => ({ value: s.name, label: s.name })), "DPM++ 2M");
    fillSelect($("scheduler"), schedulers.map((s) => ({ value: s.label, label: s.label })), "Automatic");
    models = listed;
    fillSelect($("model"), models.map((m) => ({ value: m.title, label: `${m.title} (${modelKind(m)})` })), options.sd_model_checkpoint);
    fillSelect($("refiner_checkpoint"), [{ value: "", label: "None" }, ...models.map((m) => ({ value: m.title, label: m.title }))], "");
    showModel();
    const [latent, upscalers, cnModels, cnModules] = await Promise.all([
      api(`${API}/latent-upscale-modes`), api(`${API}/upscalers`), api("/controlnet/model_list"), api("/controlnet/module_list"),
    ]);
    const names = [...latent.map((m) => m.name), ...upscalers.map((u) => u.name).filter((n) => n !== "None")];
    fillSelect($("hr_upscaler"), names.map((n) => ({ value: n, label: n })), "Latent");
    fillSelect($("cn_model"), [{ value: "", label: "None" }, ...cnModels.model_list.map((m) => ({ value: m, label: m }))], "");
    fillSelect($("cn_module"), cnModules.module_list.map((m) => ({ value: m, label: m })), "none");
  } catch (err) {
    showError(`Could not reach the server: ${err.message}`);
  }
}

function withModel(body) {
  if ($("model").value) body.override_settings = { sd_model_checkpoint: $("model").value };
  return body;
}

function showError(message) { $("error").textContent = message || ""; }

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function hiresAndControl(body, controlImage) {
  if ($("enable_hr").checked && !body.init_images) {
    body.enable_hr = true;
    body.hr_scale = numberOrNull("hr_scale") ?? 2;
    body.hr_upscaler = $("hr_upscaler").value || "Latent";
    body.hr_second_pass_steps = numberOrNull("hr_second_pass_steps") ?? 0;
    body.denoising_strength = numberOrNull("hr_denoising_strength") ?? 0.7;
  }
  if ($("cn_model").value) {
    const unit = { enabled: true, model: $("cn_model").value, module: $("cn_module").value || "none",
                   weight: numberOrNull("cn_weight") ?? 1 };
    if (controlImage) unit.image = controlImage;
    body.alwayson_scripts = { controlnet: { args: [unit] } };
  }
  return body;
}

function payload(initImage) {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
    steps: numberOrNull("steps"),
    cfg_scale: numberOrNull("cfg_scale"),
    seed: numberOrNull("seed") ?? -1,
    batch_size: numberOrNull("batch_size") ?? 1,
  };
  for (const key of ["width", "height"]) {
    const v = numberOrNull(key);
    if (v !== null) body[key] = v;
  }
  if ($("refiner_checkpoint").value) {
    body.refiner_checkpoint = $("refiner_checkpoint").value;
    body.refiner_switch_at = numberOrNull("refiner_switch_at") ?? 0.8;
  }
  withModel(body);
  if (initImage) {
    body.init_images = [initImage];
    body.denoising_strength = numberOrNull("denoising_strength") ?? 0.75;
    if (window.MaskEditor.hasMask()) {
      body.mask = window.MaskEditor.toDataURL();
      body.mask_blur = numberOrNull("mask_blur") ?? 0;
      body.inpainting_fill = Number($("inpainting_fill").value);
      body.inpaint_full_res = $("inpaint_full_res").checked;
      body.inpaint_full_res_padding = numberOrNull("inpaint_full_res_padding") ?? 2;
    }
  }
  return body;
}

function setBusy(value) {
  busy = value;
  $("generate").disabled = value;
  $("interrupt").disabled = !value;
  $("gen-form").setAttribute("aria-busy", String(value));
}

async function poll() {
  try {
    const p = await api(`${API}/progress?skip_current_image=false`);
    if (!busy) return;
    $("progress").value = p.progress;
    const steps = p.state.sampling_steps ? ` — step ${p.state.sampling_step}/${p.state.sampling_steps}` : "";
    $("progress-text").textContent = `${Math.round(p.progress * 100)}%${steps}`;
    if (p.current_image) {
      $("preview").src = `data:image/png;base64,${p.current_image}`;
      $("preview").hidden = false;
    }
  } catch (_) { /* a missed poll is harmless */ }
  if (busy) pollTimer = setTimeout(poll, POLL_MS);
}

function addResults(result) {
  const info = JSON.parse(result.info);
  const items = result.images.map((b64, i) => {
    const seed = info.all_seeds[i];
    const text = info.infotexts[i];
    const li = document.createElement("li");
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.alt = `Generated: ${info.prompt} (seed ${seed})`;
    const caption = document.createElement("figcaption");
    const pre = document.createElement("pre");
    pre.textContent = text;
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `opensd-${seed}.png`;
    link.textContent = `Download PNG (seed ${seed})`;
    caption.append(pre, link);
    figure.append(img, caption);
    li.append(figure);
    return li;
  });
  $("gallery").prepend(...items);
  $("gallery-empty").hidden = true;
}

async function generate(event) {
  if (event) event.preventDefault();
  if (busy) return;
  showError("");
  setBusy(true);
  const file = $("init_image").files[0];
  const controlFile = $("cn_image").files[0];
  let body;
  try {
    body = hiresAndControl(payload(file ? await readFile(file) : null), controlFile ? await readFile(controlFile) : null);
  } catch (err) {
    showError(`Could not read the image file: ${err.message}`);
    setBusy(false);
    return;
  }
  const endpoint = body.init_images ? "img2img" : "txt2img";
  $("progress").value = 0;
  $("progress-text").textContent = "Queued…";
  pollTimer = setTimeout(poll, POLL_MS);
  try {
    const result = await api(`${API}/${endpoint}`, { method: "POST", body: JSON.stringify(body) });
    addResults(result);
    const info = JSON.parse(result.info);
    $("progress").value = 1;
    $("progress-text").textContent = info.interrupted ? "Interrupted" : "Done";
  } catch (err) {
    showError(err.message);
    $("progress-text").textContent = "Failed";
  } finally {
    clearTimeout(pollTimer);
    setBusy(false);
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---------------------------------------------------------------- explain

let explaining = false;

function pathSteps(text) {
  const parts = text.split(",").map((s) => s.trim()).filter((s) => s !== "");
  if (parts.length === 0) return null;
  const steps = parts.map(Number);
  if (steps.some((n) => !Number.isInteger(n))) {
    throw new Error(`Path steps must be whole step numbers separated by commas, e.g. 1,5,10; got "${text}"`);
  }
  return steps;
}

function explainPayload() {
  const body = {
    prompt: $("explain-prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
    cfg_scale: numberOrNull("cfg_scale"),
    steps: numberOrNull("explain-steps"),
    seed: numberOrNull("explain-seed") ?? -1,
    path_steps: pathSteps($("explain-path-steps").value),
    segmenter: $("explain-segmenter").value,
  };
  for (const key of ["width", "height"]) {
    const v = numberOrNull(key);
    if (v !== null) body[key] = v;
  }
  return withModel(body);
}

function panel(title, b64, alt, note = null) {
  const li = document.createElement("li");
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${b64}`;
  img.alt = alt;
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  if (note !== null) {
    const small = document.createElement("span");
    small.className = "hint";
    small.textContent = note;
    caption.append(small);
  }
  figure.append(img, caption);
  li.append(figure);
  return li;
}

function wordPanel(word, b64) {
  return panel(word, b64, `Attention of the word "${word}" over the image`);
}

function shapeNote(shape, agreements) {
  const a = agreements.find((x) => x.shape === shape);
  if (!a) return "no word of the prompt names it";
  return `"${a.word}": ${a.inside.toFixed(2)} of its attention inside (area ${a.area.toFixed(2)}, IoU ${a.iou.toFixed(2)})`;
}

function showSegmentation(seg, reason) {
  $("explain-segmentation-reason").textContent = seg ? "" : `No segmenter: ${reason}`;
  if (!seg) {
    $("explain-shapes").replaceChildren();
    return;
  }
  const panels = [panel("classes", seg.class_map, "The segmenter's most probable class per pixel",
    "background white, then red, green, blue")];
  seg.classes.slice(1).forEach((shape, i) => panels.push(panel(shape, seg.maps[i],
    `The segmenter's probability of ${shape} over the image`, shapeNote(shape, seg.agreements))));
  $("explain-shapes").replaceChildren(...panels);
}

function showExplanation(result) {
  $("explain-image").src = `data:image/png;base64,${result.image}`;
  $("explain-seed-text").textContent = `Seed ${result.seed}, ${result.width}x${result.height}`;
  $("explain-words").replaceChildren(...result.words.map((w, i) => wordPanel(w, result.overlays[i])));
  showSegmentation(result.segmentation, result.segmentation_reason);
  $("explain-path").hidden = !result.path;
  if (result.path) $("explain-path").src = `data:image/png;base64,${result.path}`;
  $("explain-result").hidden = false;
}

async function runExplain(event) {
  if (event) event.preventDefault();
  if (explaining) return;
  $("explain-error").textContent = "";
  let body;
  try {
    body = explainPayload();
  } catch (err) {
    $("explain-error").textContent = err.message;
    return;
  }
  explaining = true;
  $("explain-run").disabled = true;
  $("explain-form").setAttribute("aria-busy", "true");
  $("explain-status").textContent = "Running…";
  try {
    const result = await api("/opensd/v1/explain", { method: "POST", body: JSON.stringify(body) });
    showExplanation(result);
    $("explain-status").textContent = result.interrupted ? "Interrupted" : "Done";
  } catch (err) {
    $("explain-error").textContent = err.message;
    $("explain-status").textContent = "Failed";
  } finally {
    explaining = false;
    $("explain-run").disabled = false;
    $("explain-form").setAttribute("aria-busy", "false");
  }
}

// ---------------------------------------------------------------- wiring

$("model").addEventListener("change", showModel);
$("gen-form").addEventListener("submit", generate);
$("gen-form").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("gen-form").requestSubmit();
  }
});
$("interrupt").addEventListener("click", () => api(`${API}/interrupt`, { method: "POST" }).catch((e) => showError(e.message)));
$("clear-image").addEventListener("click", () => { $("init_image").value = ""; window.MaskEditor.reset(); });
$("init_image").addEventListener("change", () => {
  const file = $("init_image").files[0];
  showError("");
  if (!file) { window.MaskEditor.reset(); return; }
  window.MaskEditor.load(file).catch((err) => showError(`Could not show the image: ${err.message}`));
});
$("explain-form").addEventListener("submit", runExplain);
$("explain-form").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("explain-form").requestSubmit();
  }
});

loadChoices();
