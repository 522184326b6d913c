// The chat page: a conversation sent to /v1/chat/completions (the model's own template) with
// stream: true, the reply read from the server-sent events as it arrives. A base model (no
// template) is prompted through /v1/completions with a plain "User: / Assistant:" transcript,
// as `scratchlm chat` does. When the server refuses, its OpenAI-shaped error is shown.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];     // [{role, content}] of the finished turns
let modelId = null;
let chatTemplate = null;     // the template's name, or null for a base model
let controller = null;       // aborts the reply in flight

const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "seed", "api-key"];
for (const id of SETTINGS) {  // settings survive a reload
  const saved = localStorage.getItem("scratchlm." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("scratchlm." + id, $(id).value));
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

async function refusal(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status line */ }
  return "The server refused (" + response.status + "): " + message;
}

async function connect() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (!response.ok) {
      $("model").textContent = "not connected";
      bubble("error", await refusal(response));
      return;
    }
    const card = (await response.json()).data[0];
    modelId = card.id;
    chatTemplate = card.chat_template;
    $("model").textContent = card.id + " · " + card.quantization + " · context " +
      card.max_model_len;
    $("mode").textContent = chatTemplate
      ? "Chat template: " + chatTemplate
      : "Base model (no chat template): prompted with a plain User/Assistant transcript.";
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

function sampling() {
  const body = {
    model: modelId,
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function request(message) {
  const system = $("system").value.trim();
  const turns = (system ? [{role: "system", content: system}] : []).concat(
    conversation, [{role: "user", content: message}]);
  if (chatTemplate) {
    return ["/v1/chat/completions", Object.assign(sampling(), {messages: turns})];
  }
  let prompt = system ? system + "\n" : "";
  for (const t of turns.filter((t) => t.role !== "system")) {
    prompt += (t.role === "user" ? "User: " : "Assistant: ") + t.content + "\n";
  }
  prompt = prompt.slice(0, -1) + "\nAssistant:";
  return ["/v1/completions", Object.assign(sampling(), {prompt: prompt, stop: ["\nUser:"]})];
}

// Yields the JSON of each "data:" event of a server-sent event stream until [DONE].
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
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(message) {
  bubble("user", message);
  const reply = bubble("assistant", "");
  reply.dataset.state = "streaming";
  reply.dataset.chunks = "0";
  $("send").disabled = true;
  $("stop").disabled = false;
  controller = new AbortController();
  const [url, body] = request(message);
  let text = "";
  try {
    const response = await fetch(url, {method: "POST", headers: headers(),
                                       body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw new Error(await refusal(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error("The server failed: " + chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      const piece = chatTemplate ? (choice.delta.content || "") : (choice.text || "");
      if (piece) {
        text += piece;
        reply.textContent = text;
        reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
        reply.scrollIntoView({block: "end"});
      }
      if (choice.finish_reason) reply.dataset.finish = choice.finish_reason;
    }
    reply.dataset.state = "done";
    conversation.push({role: "user", content: message}, {role: "assistant", content: text.trim()});
  } catch (e) {
    if (e.name === "AbortError") {
      reply.dataset.state = "done";
      reply.dataset.finish = "stopped";
      conversation.push({role: "user", content: message}, {role: "assistant", content: text.trim()});
    } else {
      reply.dataset.state = "error";
      if (!text) reply.remove();
      bubble("error", e.message);
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const message = $("input").value.trim();
  if (!message || controller) return;
  $("input").value = "";
  send(message);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").textContent = "";
});
$("api-key").addEventListener("change", connect);
connect();
