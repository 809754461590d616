// The chat page: sign in, conversation list, streaming answers over the WebSocket with a stop
// button, thumbs up/down with a reason, regenerate, and compare mode (two answers side by side,
// the preferred one stored as a ranking).

import { ApiError, api, apiErrorHandler, el, getKey, setupSignIn } from "./api.js";
import { answerView } from "./answer.js";
import { buildTurns, historyOf } from "./conversation.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  messages: $("messages"),
  empty: $("empty-state"),
  composer: $("composer"),
  input: $("composer-input"),
  send: $("send"),
  stop: $("stop"),
  compare: $("compare"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  status: $("status"),
  list: $("conversation-list"),
  listEmpty: $("conversation-empty"),
  newChat: $("new-chat"),
  sidebar: $("sidebar"),
  menu: $("menu-toggle"),
  policy: $("policy-badge"),
  user: $("user-name"),
  signout: $("signout"),
};

const SETTINGS_STORAGE = "palmchat.settings";

// The conversation on screen: its id (null until the server stored its first answer) and turns.
let conv = { id: null, turns: [] };
let conversations = [];
const running = new Map(); // request_id -> assistant turn being generated
let requestCounter = 0;

// ----------------------------------------------------------------------------- status line

function setStatus(text, kind = "") {
  ui.status.textContent = text;
  ui.status.className = `status ${kind}`;
}

const handleApiError = apiErrorHandler({ signOut, setStatus });
const { renderTurn, renderChoiceText, updateTurn } = answerView({ regenerate, setStatus, handleApiError });

// ----------------------------------------------------------------------------- WebSocket

let socket = null;
let socketReady = null;

function connect() {
  if (socketReady) return socketReady;
  socketReady = new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/v1/chat/ws`);
    let ready = false;
    ws.addEventListener("open", () => {
      // The key goes in the first frame, not the URL, so it never lands in access logs.
      ws.send(JSON.stringify({ type: "auth", api_key: getKey() }));
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (!ready) {
        if (frame.type === "ready") {
          ready = true;
          socket = ws;
          ui.user.textContent = frame.user || "";
          resolve(ws);
        } else if (frame.type === "error") {
          reject(new ApiError(frame.error?.type === "authentication_error" ? 401 : 400, frame));
        }
        return;
      }
      onFrame(frame);
    });
    ws.addEventListener("close", () => {
      socket = null;
      socketReady = null;
      if (!ready) {
        reject(new ApiError(0, { error: { message: "could not open the chat connection" } }));
        return;
      }
      for (const turn of running.values()) {
        failTurn(turn, "The connection to the server was lost; try again.");
      }
      running.clear();
      updateBusy();
    });
  });
  return socketReady;
}

function onFrame(frame) {
  const turn = frame.request_id ? running.get(frame.request_id) : null;
  if (frame.type === "delta" && turn) {
    const choice = turn.choices[frame.index];
    if (!choice) return;
    choice.text += frame.content;
    renderChoiceText(turn, choice);
    keepScrolled();
  } else if (frame.type === "done" && turn) {
    running.delete(frame.request_id);
    finishTurn(turn, frame);
  } else if (frame.type === "error") {
    const message = frame.error?.message || "error";
    if (turn) {
      running.delete(frame.request_id);
      failTurn(turn, message);
    } else {
      setStatus(message, "error");
    }
  }
  updateBusy();
}

// ----------------------------------------------------------------------------- settings

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    if (s.temperature !== undefined) ui.temperature.value = s.temperature;
    if (s.maxTokens !== undefined) ui.maxTokens.value = s.maxTokens;
    ui.compare.checked = !!s.compare;
  } catch {
    localStorage.removeItem(SETTINGS_STORAGE);
  }
}

function saveSettings() {
  localStorage.setItem(
    SETTINGS_STORAGE,
    JSON.stringify({
      temperature: ui.temperature.value,
      maxTokens: ui.maxTokens.value,
      compare: ui.compare.checked,
    }),
  );
}

function samplingParams() {
  const params = {};
  const t = Number.parseFloat(ui.temperature.value);
  if (Number.isFinite(t)) params.temperature = Math.min(2, Math.max(0, t));
  const m = Number.parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(m) && m > 0) params.max_tokens = m;
  return params;
}

// ----------------------------------------------------------------------------- rendering

function render() {
  ui.messages.replaceChildren();
  conv.turns.forEach((turn) => ui.messages.append(renderTurn(turn)));
  ui.empty.hidden = conv.turns.length > 0;
  updateRegenerate();
  renderList();
}

function updateRegenerate() {
  const lastAssistant = [...conv.turns].reverse().find((t) => t.kind === "assistant");
  for (const turn of conv.turns) {
    if (turn.kind !== "assistant" || !turn.regenerate) continue;
    const show = turn === lastAssistant && turn === conv.turns.at(-1);
    turn.regenerate.hidden = !show;
    turn.regenerate.disabled = running.size > 0;
  }
}

function updateBusy() {
  const busy = running.size > 0;
  ui.stop.hidden = !busy;
  ui.send.disabled = busy;
  if (busy) setStatus("palmchat is writing… (Esc or Stop to stop)");
  updateRegenerate();
}

function keepScrolled() {
  const box = ui.messages;
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 160) box.scrollTop = box.scrollHeight;
}

// ----------------------------------------------------------------------------- conversation list

function renderList() {
  ui.list.replaceChildren();
  ui.listEmpty.hidden = conversations.length > 0;
  for (const c of conversations) {
    const title = c.title || "Untitled";
    const current = c.id === conv.id;
    ui.list.append(
      el(
        "li",
        { class: current ? "current" : "", dataset: { id: c.id } },
        el(
          "button",
          {
            type: "button",
            class: "conversation-open",
            "aria-current": current ? "true" : null,
            title,
            onclick: () => openConversation(c.id),
          },
          title,
        ),
        el(
          "button",
          {
            type: "button",
            class: "icon-button conversation-delete",
            "aria-label": `Delete conversation: ${title}`,
            title: "Delete",
            onclick: () => deleteConversation(c.id),
          },
          el("span", { "aria-hidden": "true" }, "✕"),
        ),
      ),
    );
  }
}

async function refreshList() {
  try {
    const res = await api("/v1/conversations?limit=100");
    conversations = res.data;
    renderList();
  } catch (e) {
    handleApiError(e, "Could not load your conversations");
  }
}

function stopAll() {
  for (const requestId of running.keys()) {
    socket?.send(JSON.stringify({ type: "cancel", request_id: requestId }));
  }
}

async function openConversation(id) {
  closeSidebar();
  if (running.size) stopAll();
  setStatus("Loading…");
  try {
    const data = await api(`/v1/conversations/${encodeURIComponent(id)}`);
    conv = { id: data.id, turns: buildTurns(data.messages) };
    conv.turns.forEach((t) => {
      t.uid = ++requestCounter;
    });
    render();
    setStatus("");
    ui.messages.scrollTop = ui.messages.scrollHeight;
    ui.input.focus();
  } catch (e) {
    if (e.status === 404) {
      setStatus("That conversation no longer exists.", "error");
      await refreshList();
    } else handleApiError(e, "Could not open the conversation");
  }
}

function newConversation() {
  closeSidebar();
  if (running.size) stopAll();
  conv = { id: null, turns: [] };
  render();
  setStatus("");
  ui.input.focus();
}

async function deleteConversation(id) {
  const title = conversations.find((c) => c.id === id)?.title || "conversation";
  try {
    await api(`/v1/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (e) {
    if (e.status !== 404) {
      handleApiError(e, "Could not delete the conversation");
      return;
    }
  }
  conversations = conversations.filter((c) => c.id !== id);
  if (conv.id === id) newConversation();
  else renderList();
  setStatus(`Deleted “${title}”.`);
  (ui.list.querySelector(".conversation-open") || ui.newChat).focus();
}

/** The conversation a cut-off first answer was stored in (a cancelled answer's done frame has
 * no conversation id, and it is written in the background). */
async function findConversation(completionId) {
  for (let attempt = 0; attempt < 10; attempt++) {
    try {
      const res = await api("/v1/conversations?limit=5");
      for (const c of res.data) {
        const data = await api(`/v1/conversations/${encodeURIComponent(c.id)}`);
        if (data.messages.some((m) => m.completion_id === completionId)) return c.id;
      }
    } catch (e) {
      if (e.status === 401) throw e;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return null;
}

// ----------------------------------------------------------------------------- generating

function newAssistantTurn(n) {
  return {
    kind: "assistant",
    uid: ++requestCounter,
    completionId: null,
    policyVersion: null,
    choices: Array.from({ length: n }, (_, index) => ({ index, text: "", rating: null })),
    picked: null,
    status: "streaming",
    conv,
  };
}

async function generate(history, turn, { continueConversation = true } = {}) {
  const requestId = `page-${turn.uid}`;
  turn.requestId = requestId;
  running.set(requestId, turn);
  updateBusy();
  const frame = {
    type: "chat",
    request_id: requestId,
    messages: history,
    n: turn.choices.length,
    ...samplingParams(),
  };
  try {
    if (turn.conv.pending) await turn.conv.pending;
    if (continueConversation && turn.conv.id) frame.conversation_id = turn.conv.id;
    const ws = await connect();
    ws.send(JSON.stringify(frame));
  } catch (e) {
    running.delete(requestId);
    failTurn(turn, e.message);
    updateBusy();
    if (e.status === 401) signOut("Your API key is no longer valid.");
  }
}

async function finishTurn(turn, frame) {
  turn.status = frame.cancelled ? "cancelled" : "done";
  turn.completionId = frame.completion_id;
  turn.policyVersion = frame.policy_version || null;
  (frame.finish_reasons || []).forEach((reason, i) => {
    if (turn.choices[i]) turn.choices[i].finishReason = reason;
  });
  if (turn.policyVersion) ui.policy.textContent = `serving ${turn.policyVersion}`;
  updateTurn(turn);
  updateRegenerate();
  setStatus(frame.cancelled ? "Stopped." : "");
  const owner = turn.conv;
  if (frame.conversation_id) {
    owner.id = frame.conversation_id;
  } else if (!owner.id && frame.completion_id) {
    // A next message must wait for this id, or it would start yet another conversation.
    owner.pending = findConversation(frame.completion_id).catch(() => null);
    owner.id = await owner.pending;
    owner.pending = null;
  }
  await refreshList();
}

function failTurn(turn, message) {
  turn.status = "error";
  turn.error = message;
  updateTurn(turn);
  updateRegenerate();
  setStatus(message, "error");
}

function send() {
  const text = ui.input.value;
  if (!text.trim()) {
    setStatus("Type a message first.");
    return;
  }
  if (running.size) {
    setStatus("Wait for the answer, or press Stop (Esc).");
    return;
  }
  const n = ui.compare.checked ? 2 : 1;
  conv.turns.push({ kind: "user", content: text });
  const history = historyOf(conv.turns);
  const turn = newAssistantTurn(n);
  conv.turns.push(turn);
  ui.input.value = "";
  render();
  ui.messages.scrollTop = ui.messages.scrollHeight;
  generate(history, turn);
}

function regenerate(turn) {
  if (running.size) return;
  const at = conv.turns.indexOf(turn);
  if (at < 0) return;
  const before = conv.turns.slice(0, at);
  const history = historyOf(before);
  // The store files a regeneration next to the earlier answer by matching the last assistant
  // message of the history; a first answer has none to match, so it starts a new conversation.
  const continueConversation = before.some((t) => t.kind === "assistant" && t.status !== "error");
  if (!continueConversation) conv = { id: null, turns: before };
  const fresh = newAssistantTurn(turn.choices.length);
  conv.turns = [...before, fresh];
  render();
  generate(history, fresh, { continueConversation });
}

// ----------------------------------------------------------------------------- plumbing

function closeSidebar() {
  ui.app.classList.remove("sidebar-open");
  ui.menu.setAttribute("aria-expanded", "false");
}

let signOutForm = () => {};

function signOut(message) {
  stopAll();
  socket?.close();
  conv = { id: null, turns: [] };
  conversations = [];
  render();
  signOutForm();
  if (message) document.getElementById("signin-error").textContent = message;
}

async function onSignedIn() {
  loadSettings();
  conv = { id: null, turns: [] };
  render();
  ui.input.focus();
  connect().catch((e) => setStatus(e.message, "error"));
  await refreshList();
  try {
    const models = await api("/v1/models");
    const version = models.data.find((m) => m.id !== "palmchat")?.id;
    if (version) ui.policy.textContent = `serving ${version}`;
  } catch {
    ui.policy.textContent = "";
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  if (running.size) {
    event.preventDefault();
    stopAll();
  } else if (ui.app.classList.contains("sidebar-open")) {
    closeSidebar();
    ui.menu.focus();
  }
});
ui.stop.addEventListener("click", () => {
  stopAll();
  ui.input.focus();
});
ui.newChat.addEventListener("click", newConversation);
ui.signout.addEventListener("click", () => signOut(""));
ui.menu.addEventListener("click", () => {
  const open = ui.app.classList.toggle("sidebar-open");
  ui.menu.setAttribute("aria-expanded", String(open));
  if (open) ui.newChat.focus();
});
for (const input of [ui.temperature, ui.maxTokens, ui.compare]) {
  input.addEventListener("change", saveSettings);
}

signOutForm = setupSignIn({
  section: document.getElementById("signin"),
  form: document.getElementById("signin-form"),
  input: document.getElementById("api-key"),
  errorBox: document.getElementById("signin-error"),
  app: ui.app,
  check: (key) => api("/v1/models", { key }),
  onSignedIn,
});
