// The chat page: a client of /v1/chat/completions like any other, streaming, with the reasoning
// folded above each answer and the answer rendered as sanitized markdown (marked + DOMPurify, vendored).
// Nothing the model writes is fetched: its images are links, its HTML cannot load anything (a prompt
// injection could otherwise send the conversation anywhere in an image's URL).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // the conversation sent with each request: {role, content}
let running = null;  // the AbortController of the request in flight
let following = true;  // the page scrolls with the answer, until the reader scrolls up

const saved = ["key", "system", "budget", "max-tokens"];
for (const id of saved) {
  $(id).value = localStorage.getItem("qwen3-mlx." + id) || "";
  $(id).addEventListener("change", () => localStorage.setItem("qwen3-mlx." + id, $(id).value));
}
$("think").checked = localStorage.getItem("qwen3-mlx.think") !== "false";
$("think").addEventListener("change", () => localStorage.setItem("qwen3-mlx.think", $("think").checked));

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function status(text) { $("status").textContent = text; }

const escaped = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
// A markdown image is a link to it, never loaded.
marked.use({renderer: {image: ({href, text}) =>
  `<a class="image-link" href="${escaped(href || "")}" rel="noopener noreferrer" target="_blank">` +
  `[image${text ? ": " + escaped(text) : ""}]</a>`}});
// Whatever loads a URL by itself is left out of the model's HTML (sanitizing runs in an inert document).
const PURIFY = {USE_PROFILES: {html: true},
                FORBID_TAGS: ["img", "picture", "source", "video", "audio", "track", "input", "style", "link",
                              "iframe", "object", "embed", "meta", "base"],
                FORBID_ATTR: ["style", "srcset", "poster", "background", "ping"]};

function markdown(text) {
  return DOMPurify.sanitize(marked.parse(text, {async: false}), PURIFY);
}

const nearBottom = () => window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 48;
window.addEventListener("scroll", () => { following = nearBottom(); }, {passive: true});
function follow() {
  if (following) window.scrollTo(0, document.documentElement.scrollHeight);
}

function keyProblem() {
  if ($("key").value) return "The server refused the API key (401): check it under Settings, then send again.";
  return "The server needs an API key (401): enter it under Settings, then send again.";
}

// Why a request failed, in words a person can act on.
function explain(code, body) {
  const message = (body && body.error && body.error.message) || "";
  if (code === 401) {
    $("settings").open = true;
    $("key").focus();
    return keyProblem();
  }
  if (code === 429) return "The server is busy (429): wait a moment and send again.";
  if (code === 503) return "The server is shutting down (503): send again once it is back.";
  return `The server answered ${code}${message ? ": " + message : ""}`;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (response.ok) $("model").textContent = (await response.json()).data[0].id;
    else if (response.status === 401) status(keyProblem());  // told, without taking the focus from the reader
  } catch (e) { status("The server cannot be reached: " + e.message); }
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  $("conversation").appendChild(div);
  return div;
}

function assistantBubble() {
  const div = bubble("assistant");
  const details = document.createElement("details");
  details.className = "reasoning";
  details.hidden = true;
  const summary = document.createElement("summary");
  const text = document.createElement("div");
  text.className = "text";
  details.append(summary, text);
  const answer = document.createElement("div");
  answer.className = "answer";
  const note = document.createElement("div");
  note.className = "note";
  div.append(details, answer, note);
  return {div, details, summary, reasoning: text, answer, note};
}

function requestBody() {
  const messages = [];
  if ($("system").value.trim()) messages.push({role: "system", content: $("system").value});
  messages.push(...history);
  const body = {messages, stream: true, stream_options: {include_usage: true},
                chat_template_kwargs: {enable_thinking: $("think").checked}};
  if ($("think").checked && $("budget").value !== "") body.thinking_budget = Number($("budget").value);
  if ($("max-tokens").value !== "") body.max_tokens = Number($("max-tokens").value);
  return body;
}

// The server-sent events of a response, one parsed `data:` object at a time.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function show(view, state) {
  if (state.reasoning) {
    view.details.hidden = false;
    view.reasoning.textContent = state.reasoning;
    const exact = state.reasoningTokens !== null;
    view.summary.textContent = `Reasoning (${exact ? "" : "~"}${exact ? state.reasoningTokens : state.reasoningChunks} tokens)`;
  }
  view.answer.innerHTML = markdown(state.answer);
  // The note keeps both: a cut answer's words and the token count (the usage comes after the finish).
  view.note.textContent = [state.stopped && "Stopped.", state.cut && "Cut at the token limit.",
                           state.tokens !== null && `${state.tokens} tokens`].filter(Boolean).join(" ");
  follow();
}

async function send(text) {
  history.push({role: "user", content: text});
  bubble("user").textContent = text;
  const view = assistantBubble();
  const state = {reasoning: "", answer: "", reasoningChunks: 0, reasoningTokens: null, tokens: null, cut: false,
                 stopped: false};
  following = true;
  follow();
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  status("Waiting for the first token...");
  let drawn = false;
  const draw = () => { if (!drawn) { drawn = true; requestAnimationFrame(() => { drawn = false; show(view, state); }); } };
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                          body: JSON.stringify(requestBody()), signal: running.signal});
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (e) { /* not JSON */ }
      throw new Error(explain(response.status, body));
    }
    status("Generating...");
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(explain(chunk.error.code === "shutting_down" ? 503 : 500, chunk));
      if (chunk.usage && !chunk.choices.length) {
        state.reasoningTokens = chunk.usage.completion_tokens_details.reasoning_tokens;
        state.tokens = chunk.usage.completion_tokens;
      }
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) { state.reasoning += delta.reasoning_content; state.reasoningChunks += 1; }
        if (delta.content) state.answer += delta.content;
        if (choice.finish_reason === "length") state.cut = true;
      }
      draw();
    }
    status("");
  } catch (e) {
    if (e.name === "AbortError") {
      state.stopped = true;
      status("Stopped: the request was cancelled.");
    } else {
      const error = document.createElement("div");
      error.className = "error";
      error.textContent = e instanceof TypeError ? "The server cannot be reached (" + e.message + "): is it running?"
                                                 : e.message;
      view.div.appendChild(error);
      status("");
    }
  } finally {
    show(view, state);
    if (state.answer) history.push({role: "assistant", content: state.answer});
    else history.pop();  // nothing came back: the question can be sent again
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (running) running.abort(); });
$("clear").addEventListener("click", () => { history.length = 0; $("conversation").textContent = ""; });
$("key").addEventListener("change", loadModel);
loadModel();
