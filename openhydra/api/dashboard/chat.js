// OpenHydra dashboard: the chat playground. Streams replies from this node's POST /v1/chat/completions
// (fetch + server-sent events parsed by hand, stoppable with an AbortController). Uses the helpers and
// the shared `state` of app.js, which loads after this file and calls initChat().
"use strict";

function renderChatModels(m) {
  const select = $("chat-model");
  const ids = m ? [m.id] : [];
  const current = Array.from(select.options).map((o) => o.value);
  if (ids.join() === current.join()) return;
  const chosen = select.value;
  select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  if (ids.includes(chosen)) select.value = chosen;
}

function addMessage(role, text) {
  const body = el("div", { class: "msg-body" }, text);
  const node = el("div", { class: `msg msg-${role}`, "data-role": role }, el("div", { class: "msg-role" }, role), body);
  $("chat-log").append(node);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return { node, body };
}

function setChatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
  $("chat-input").disabled = busy;
}

// Split a growing SSE buffer into complete events; returns [events, rest].
function takeEvents(buffer) {
  const parts = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const rest = parts.pop();
  const events = parts.map((block) => block.split("\n").filter((l) => l.startsWith("data:"))
    .map((l) => l.slice(5).replace(/^ /, "")).join("\n")).filter((d) => d.length);
  return [events, rest];
}

async function sendChat(text) {
  const model = $("chat-model").value;
  if (!model) { showError("the node has no model ready to chat with yet"); return; }
  state.chat.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.node.dataset.state = "waiting";
  reply.node.dataset.chunks = "0";
  const controller = new AbortController();
  state.abort = controller;
  setChatBusy(true);
  const started = performance.now();
  let firstAt = null, chunks = 0, content = "", finish = null;
  const stats = () => {
    const secs = (performance.now() - started) / 1000;
    const gen = firstAt === null ? 0 : (performance.now() - firstAt) / 1000;
    $("chat-stats").textContent = [
      `${chunks} chunk(s)`, firstAt === null ? "waiting for the first token" : `first token ${fmtNum((firstAt - started), 0)} ms`,
      gen > 0 ? `${fmtNum(chunks / gen, 1)} chunks/s` : null, `${fmtNum(secs, 1)} s`, finish ? `finish: ${finish}` : null,
    ].filter(Boolean).join(" · ");
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({
        model, messages: state.chat, stream: true,
        max_tokens: Number($("chat-max-tokens").value) || 64,
        temperature: Number($("chat-temperature").value),
      }),
      signal: controller.signal,
    });
    if (response.status === 401) askForToken("Chat needs the node's bearer token (401).");
    if (!response.ok) throw new Error(await errorText(response));
    const degraded = response.headers.get("X-OpenHydra-Degradation-Reason");
    if (degraded) reply.node.append(el("div", { class: "msg-note" }, `served by a fallback: ${degraded}`));
    reply.node.dataset.state = "streaming";
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer += decoder.decode(value, { stream: true });
      let events;
      [events, buffer] = takeEvents(buffer);
      for (const data of events) {
        if (data === "[DONE]") { done = true; break; }
        const event = JSON.parse(data);
        if (event.error) throw new Error(`stream error: ${event.error.message}`);
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (firstAt === null) firstAt = performance.now();
          content += delta;
          chunks += 1;
          reply.body.textContent = content;
          reply.node.dataset.chunks = String(chunks);
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        }
      }
      stats();
    }
    reply.node.dataset.state = "done";
    if (!content) reply.body.textContent = "(empty reply)";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.node.dataset.state = "stopped";
      reply.node.append(el("div", { class: "msg-note" }, "stopped"));
    } else {
      reply.node.dataset.state = "error";
      reply.node.append(el("div", { class: "msg-note bad" }, `error: ${err.message}`));
      showError(`chat: ${err.message}`);
    }
  } finally {
    if (content) state.chat.push({ role: "assistant", content });
    else state.chat.pop();  // keep the history valid: drop a user turn that got no answer
    state.abort = null;
    setChatBusy(false);
    stats();
    $("chat-input").focus();
  }
}

function initChat() {
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || state.abort) return;
    $("chat-input").value = "";
    sendChat(text);
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("chat-clear").addEventListener("click", () => {
    state.chat = [];
    $("chat-log").replaceChildren();
    $("chat-stats").textContent = "";
  });
}
