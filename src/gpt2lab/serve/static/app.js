// gpt2lab's page: streams a completion from /v1/completions (server-sent events), lists the top next-token
// probabilities of each generated position, and draws one head's attention over the prompt (/v1/attention).
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let running = null; // the AbortController of the completion being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h.Authorization = "Bearer " + $("api_key").value;
  return h;
}

function showError(message) { $("error").textContent = message || ""; }

async function apiError(response) {
  try { return (await response.json()).error.message; } catch { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { $("status").textContent = "models: " + (await apiError(response)); return; }
  models = (await response.json()).data;
  $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  $("status").textContent = models.length + " model(s) served";
  fillLayers();
}

function fillLayers() {
  const m = models.find((x) => x.id === $("model").value);
  if (!m) return;
  const windows = m.windows || [];
  $("layer").replaceChildren(...Array.from({ length: m.n_layer }, (_, i) =>
    new Option(windows[i] ? `${i} · window ${windows[i]}` : `${i}`, i)));
  $("head").replaceChildren(...Array.from({ length: m.n_head }, (_, i) => new Option(i, i)));
}

function request() {
  const body = {
    model: $("model").value, prompt: $("prompt").value, stream: true, logprobs: 5,
    max_tokens: parseInt($("max_tokens").value, 10), temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
  };
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  const stop = $("stop").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  if (stop) body.stop = stop;
  return body;
}

function addPosition(index, lp) {
  const line = document.createElement("div");
  line.className = "position";
  const number = document.createElement("span");
  number.className = "index";
  number.textContent = index;
  line.append(number);
  const chosen = lp.tokens[0];
  for (const [token, logprob] of Object.entries(lp.top_logprobs[0])) {
    const p = Math.exp(logprob);
    const cell = document.createElement("span");
    cell.className = "candidate" + (token === chosen ? " chosen" : "");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(1, Math.round(40 * p)) + "px";
    const percent = 100 * p >= 0.1 ? (100 * p).toFixed(1) : (100 * p).toPrecision(2);
    cell.append(JSON.stringify(token), bar, percent + "%");
    line.append(cell);
  }
  $("probs").append(line);
}

async function generate() {
  showError("");
  const body = request();
  $("prompt-echo").textContent = body.prompt;
  $("completion").textContent = "";
  $("probs").replaceChildren();
  running = new AbortController();
  $("generate").disabled = true; $("cancel").disabled = false;
  drawAttention();
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal });
    if (!response.ok) { showError(await apiError(response)); return; }
    await readEvents(response.body.getReader());
  } catch (err) {
    if (err.name !== "AbortError") showError(String(err));
  } finally {
    running = null;
    $("generate").disabled = false; $("cancel").disabled = true;
  }
}

async function readEvents(reader) {
  const decoder = new TextDecoder();
  let buffer = "", position = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (event === "[DONE]") { $("status").textContent = "done"; return; }
      const chunk = JSON.parse(event);
      if (chunk.error) { showError(chunk.error.message); return; }
      const choice = chunk.choices[0];
      $("completion").textContent += choice.text;
      if (choice.logprobs) addPosition(position++, choice.logprobs);
      if (choice.finish_reason) $("status").textContent = "finished: " + choice.finish_reason;
    }
  }
}

async function drawAttention() {
  const body = { model: $("model").value, prompt: $("prompt").value,
    layer: parseInt($("layer").value || "0", 10), head: parseInt($("head").value || "0", 10) };
  const response = await fetch("/v1/attention", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) { $("attention-info").textContent = await apiError(response); return; }
  const view = await response.json();
  paint(view);
  const band = view.window ? `sliding window of ${view.window}: the band` : "full causal attention";
  $("attention-info").textContent = `${view.tokens.length} tokens, layer ${view.layer} head ${view.head}, ${band}`;
  $("attention").dataset.rendered = String(view.tokens.length);
}

function paint(view) {
  const canvas = $("attention"), ctx = canvas.getContext("2d");
  const n = view.tokens.length, margin = 90, cell = (canvas.width - margin) / n;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  view.weights.forEach((row, q) => row.forEach((w, k) => {
    // sqrt brightens small weights so that a long prompt's spread-out attention stays visible
    const shade = Math.round(255 * (1 - Math.sqrt(w)));
    ctx.fillStyle = `rgb(${shade},${shade},255)`;
    ctx.fillRect(margin + k * cell, margin + q * cell, Math.ceil(cell), Math.ceil(cell));
  }));
  ctx.fillStyle = "#1d232b";
  ctx.font = `${Math.min(12, Math.max(7, cell * 0.8))}px monospace`;
  view.tokens.forEach((t, i) => {
    const label = JSON.stringify(t).slice(1, -1).slice(0, 10);
    ctx.textAlign = "right";
    ctx.fillText(label, margin - 4, margin + (i + 0.7) * cell);
    ctx.save();
    ctx.translate(margin + (i + 0.7) * cell, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(label, 0, 0);
    ctx.restore();
  });
  ctx.strokeStyle = "#22303f";
  ctx.strokeRect(margin, margin, n * cell, n * cell);
}

$("generate").addEventListener("click", generate);
$("cancel").addEventListener("click", () => running && running.abort());
$("model").addEventListener("change", () => { fillLayers(); drawAttention(); });
$("layer").addEventListener("change", drawAttention);
$("head").addEventListener("change", drawAttention);
$("api_key").addEventListener("change", loadModels);
loadModels();
