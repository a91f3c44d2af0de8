// The chat page of `mistral7b serve`: plain JavaScript, no network beyond this server.
//
// It talks to the server's own OpenAI endpoint (POST /v1/chat/completions, stream: true) and
// reads the server-sent events from the response body as they arrive. Stop aborts the fetch;
// the server sees the connection close and drops the request within one step.
//
// Model text is untrusted: it is only ever put into the page as text nodes (textContent),
// never as HTML. renderMarkdown() knows fenced code blocks and inline code, nothing else.
"use strict";

const CHAT_KEY = "mistral7b.chat";          // localStorage: the conversation
const SETTINGS_KEY = "mistral7b.settings";  // localStorage: API key, system prompt, sampling
const SETTING_FIELDS = ["api-key", "system", "temperature", "top-p", "max-tokens"];

const $ = (id) => document.getElementById(id);
let conversation = [];   // [{role: "user"|"assistant", content, status?}]
let running = null;      // {controller, message, element} while an answer streams

// ---------------------------------------------------------------- rendering (text only)

function inlineCode(parent, text) {
  // `code` spans inside a line; everything else is a text node.
  const parts = text.split(/`([^`\n]+)`/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const code = document.createElement("code");
      code.textContent = part;
      parent.appendChild(code);
    } else if (part) {
      parent.appendChild(document.createTextNode(part));
    }
  });
}

function renderMarkdown(text) {
  // Paragraphs and ``` fenced code blocks (an unclosed fence, mid-stream, runs to the end).
  const frag = document.createDocumentFragment();
  let paragraph = [];
  let code = null;   // {lang, lines} inside a fence
  const flushParagraph = () => {
    if (paragraph.length) {
      const p = document.createElement("p");
      inlineCode(p, paragraph.join("\n"));
      frag.appendChild(p);
    }
    paragraph = [];
  };
  const flushCode = () => {
    const pre = document.createElement("pre");
    if (code.lang) pre.dataset.lang = code.lang;
    const el = document.createElement("code");
    el.textContent = code.lines.join("\n");
    pre.appendChild(el);
    frag.appendChild(pre);
    code = null;
  };
  for (const line of text.split("\n")) {
    const fence = line.match(/^\s*```\s*([\w+#.-]*)/);
    if (fence && code === null) {
      flushParagraph();
      code = { lang: fence[1], lines: [] };
    } else if (fence) {
      flushCode();
    } else if (code !== null) {
      code.lines.push(line);
    } else if (line.trim() === "") {
      flushParagraph();
    } else {
      paragraph.push(line);
    }
  }
  flushParagraph();
  if (code !== null) flushCode();
  return frag;
}

function messageElement(message) {
  const el = document.createElement("div");
  el.className = `msg ${message.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "you" : "assistant";
  const content = document.createElement("div");
  content.className = "content";
  el.append(role, content);
  updateMessage(el, message);
  return el;
}

const BADGES = {
  stopped: "stopped",
  length: "cut at max tokens",
  error: "failed",
};

function updateMessage(el, message) {
  el.querySelector(".content").replaceChildren(renderMarkdown(message.content));
  el.classList.toggle("streaming", message.status === "streaming");
  let badge = el.querySelector(".badge");
  const text = BADGES[message.status] || message.stats || "";
  if (!text) {
    if (badge) badge.remove();
    return;
  }
  if (!badge) {
    badge = document.createElement("div");
    el.appendChild(badge);
  }
  badge.className = `badge ${message.status || ""}`;
  badge.textContent = message.stats && BADGES[message.status]
    ? `${BADGES[message.status]} · ${message.stats}` : text;
}

function renderAll() {
  $("messages").replaceChildren(...conversation.map(messageElement));
  scrollDown(true);
}

function scrollDown(force) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) {
    box.scrollTop = box.scrollHeight;
  }
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function setRunning(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

// ---------------------------------------------------------------- storage

function save() {
  const kept = conversation.map(({ role, content, status, stats }) =>
    ({ role, content, status: status === "streaming" ? "stopped" : status, stats }));
  localStorage.setItem(CHAT_KEY, JSON.stringify(kept));
}

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(CHAT_KEY) || "[]");
    if (Array.isArray(saved)) {
      conversation = saved.filter((m) => m && (m.role === "user" || m.role === "assistant")
        && typeof m.content === "string");
    }
  } catch (e) {
    conversation = [];
  }
  let settings = {};
  try {
    settings = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") || {};
  } catch (e) {
    settings = {};
  }
  for (const id of SETTING_FIELDS) {
    if (typeof settings[id] === "string") $(id).value = settings[id];
  }
}

function saveSettings() {
  const settings = {};
  for (const id of SETTING_FIELDS) settings[id] = $(id).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

// ---------------------------------------------------------------- talking to the server

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  // The server answers errors in OpenAI's shape: {"error": {"message": ...}}.
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON: show the status line */ }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 503 && response.headers.get("Retry-After")) {
      setTimeout(loadModels, 2000);           // the model is still loading: ask again
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    select.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    if (previous && body.data.some((m) => m.id === previous)) select.value = previous;
    showError("");
  } catch (e) {
    select.replaceChildren();
    showError(`could not list the models: ${e.message}`);
  }
}

function numberField(id, parse) {
  const value = parse($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conversation) {
    if (m.status === "streaming" || (m.role === "assistant" && !m.content)) continue;
    messages.push({ role: m.role, content: m.content });
  }
  return {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberField("temperature", parseFloat),
    top_p: numberField("top-p", parseFloat),
    max_tokens: numberField("max-tokens", (v) => parseInt(v, 10)),
  };
}

async function* sseData(response) {
  // The `data:` payloads of a server-sent-event stream, as they arrive (comments skipped).
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = buffer.split(/\r?\n/);
    buffer = done ? "" : lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:")) yield line.slice(5).trim();
    }
    if (done) return;
  }
}

async function send(text) {
  showError("");
  conversation.push({ role: "user", content: text });
  const message = { role: "assistant", content: "", status: "streaming" };
  const body = requestBody();
  conversation.push(message);
  renderAll();
  save();
  const element = $("messages").lastElementChild;
  const controller = new AbortController();
  running = { controller, message, element };
  setRunning(true);
  const started = performance.now();
  let firstAt = null;    // when the first text arrived: time to first token
  let chunks = 0;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        message.content += choice.delta.content;
        if (firstAt === null) firstAt = performance.now();
        chunks += 1;
        updateMessage(element, message);
        scrollDown(false);
      }
      if (choice.finish_reason) message.finish = choice.finish_reason;
    }
    message.status = message.finish === "length" ? "length" : "done";
  } catch (e) {
    if (controller.signal.aborted) {
      message.status = "stopped";
    } else {
      message.status = "error";
      showError(e.message);
    }
  }
  message.stats = timing(usage ? usage.completion_tokens : chunks, started, firstAt);
  if (message.status === "error" && !message.content) {
    conversation.splice(conversation.indexOf(message), 1);   // nothing to keep
    element.remove();
  } else {
    updateMessage(element, message);
  }
  running = null;
  setRunning(false);
  save();
}

function timing(tokens, started, firstAt) {
  // "N tokens · first token after T s · R tok/s" (R over the tokens after the first).
  if (!tokens || firstAt === null) return "";
  const now = performance.now();
  let text = `${tokens} tokens · first token after ${((firstAt - started) / 1000).toFixed(2)} s`;
  if (tokens > 1 && now > firstAt) {
    text += ` · ${((tokens - 1) / ((now - firstAt) / 1000)).toFixed(1)} tok/s`;
  }
  return text;
}

function stop() {
  if (running) running.controller.abort();
}

function newChat() {
  stop();
  conversation = [];
  save();
  renderAll();
  showError("");
  $("prompt").focus();
}

// ---------------------------------------------------------------- wiring

function start() {
  load();
  renderAll();
  for (const id of SETTING_FIELDS) $(id).addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", loadModels);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  loadModels();
}

document.addEventListener("DOMContentLoaded", start);
