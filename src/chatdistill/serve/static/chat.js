"use strict";
const $ = (id) => document.getElementById(id);
const store = window.localStorage;
const KEYS = { apiKey: "chatdistill.apiKey", history: "chatdistill.history",
               temperature: "chatdistill.temperature", maxTokens: "chatdistill.maxTokens",
               system: "chatdistill.system" };

// The conversation sent with every request: [{role, content}], assistant turns included.
let history = JSON.parse(store.getItem(KEYS.history) || "[]");
let modelName = null;
let controller = null;  // AbortController of the answer being streamed, if any

for (const [field, key] of [["api-key", KEYS.apiKey], ["temperature", KEYS.temperature],
                            ["max-tokens", KEYS.maxTokens], ["system", KEYS.system]]) {
  const saved = store.getItem(key);
  if (saved !== null) $(field).value = saved;
  $(field).addEventListener("change", () => {
    store.setItem(key, $(field).value);
    if (field === "api-key") loadModel();
  });
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  $("empty").hidden = true;
  const wrap = document.createElement("div");
  wrap.className = "msg " + role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  const stats = document.createElement("div");
  stats.className = "stats";
  wrap.append(bubble, stats);
  $("log").append(wrap);
  $("log").scrollTop = $("log").scrollHeight;
  return { bubble, stats };
}

function render() {
  for (const el of [...$("log").querySelectorAll(".msg")]) el.remove();
  $("empty").hidden = history.length > 0;
  for (const m of history) addMessage(m.role, m.content);
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON: fall through to the status line */ }
  return `HTTP ${res.status} ${res.statusText}`;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw new Error(await errorText(res));
    const body = await res.json();
    modelName = body.data[0].id;
    const ctx = body.data[0].context_length;
    $("model").textContent = modelName + (ctx ? ` · ${ctx} token context` : "");
    $("status-dot").className = "ok";
  } catch (e) {
    $("model").textContent = e.message;
    $("status-dot").className = "bad";
  }
}

function setBusy(busy) {
  $("send").textContent = busy ? "Stop" : "Send";
  $("send").classList.toggle("primary", !busy);
  $("input").disabled = busy;
}

function formatStats(tokens, started, firstAt, now) {
  const parts = [`${tokens} tokens`];
  if (firstAt !== null) {
    const seconds = (now - firstAt) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
    parts.push(`first token ${Math.round(firstAt - started)} ms`);
  }
  return parts.join(" · ");
}

// Read an SSE body and call onEvent(json) for each `data:` event until `data: [DONE]`.
async function readSSE(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  autosize();
  history.push({ role: "user", content: text });
  store.setItem(KEYS.history, JSON.stringify(history));
  addMessage("user", text);

  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const request = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
  };
  // Left empty, the server answers with as many tokens as still fit the context window.
  if ($("max-tokens").value.trim()) request.max_completion_tokens = Number($("max-tokens").value);
  if (modelName) request.model = modelName;

  const { bubble, stats } = addMessage("assistant", "");
  bubble.classList.add("pending");
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstAt = null, chunks = 0, answer = "", usage = null, failure = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorText(res));
    await readSSE(res.body, (event) => {
      if (event.error) { failure = event.error.message; return; }
      if (event.usage) usage = event.usage;
      const piece = event.choices && event.choices[0] && event.choices[0].delta.content;
      if (!piece) return;
      if (firstAt === null) firstAt = performance.now();
      chunks += 1;
      answer += piece;
      bubble.textContent = answer;
      stats.textContent = formatStats(chunks, started, firstAt, performance.now());
      $("log").scrollTop = $("log").scrollHeight;
    });
  } catch (e) {
    if (e.name !== "AbortError") failure = e.message;
  }
  bubble.classList.remove("pending");
  const tokens = usage ? usage.completion_tokens : chunks;
  stats.textContent = formatStats(tokens, started, firstAt, performance.now());
  if (answer || (!failure && usage)) {
    // An empty but complete answer still takes its turn, so user and assistant keep alternating.
    if (!answer) bubble.textContent = "(the model ended its answer without any text)";
    history.push({ role: "assistant", content: answer });
    store.setItem(KEYS.history, JSON.stringify(history));
  } else {
    bubble.parentElement.remove();
  }
  if (failure) addMessage("error", failure);
  controller = null;
  setBusy(false);
  $("input").focus();
}

function autosize() {
  const box = $("input");
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight + 2, 200) + "px";
}

$("send").addEventListener("click", () => (controller ? controller.abort() : send()));
$("input").addEventListener("input", autosize);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  store.removeItem(KEYS.history);
  render();
  $("input").focus();
});

render();
loadModel();
$("input").focus();
