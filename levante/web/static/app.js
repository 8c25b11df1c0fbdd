// levante's web chat: a client of the server's own OpenAI API (/v1/chat/completions, streamed) whose
// conversations live in the server's store (/v1/levante/conversations, shared with `levante chat`).

import { ApiError, call, getKey, streamChat } from "./api.js";
import { loadLibraries } from "./markdown.js";
import { applyTheme, askKey, currentTheme, editSettings, loadSettings, requestFields, toggleTheme } from "./settings.js";
import { CONVERSATIONS, Sidebar } from "./sidebar.js";
import { emptyState, renderConversation, textOf } from "./view.js";

const $ = (id) => document.getElementById(id);
const WIRE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id"];
const MODEL_STORAGE = "levante.model";
const MAX_IMAGE_BYTES = 20 << 20;

const state = {
  conversationId: null,
  messages: [], // the OpenAI messages of the open conversation, without the system prompt
  metas: new WeakMap(), // message -> what the page knows beyond it: ttft, tokens, seconds, finish, stopped, streaming
  models: [],
  settings: loadSettings(),
  system: "",
  attachments: [], // data URLs of images for the next message
  controller: null, // the AbortController of the running request
};
state.system = state.settings.system;

const sidebar = new Sidebar({
  open: (id) => openConversation(id).catch(fail),
  deleted: (id) => { if (id === state.conversationId) newChat(); },
  renamed: () => {},
  failed: (error) => fail(error),
  notice: (text) => banner(text),
}, () => state.conversationId);

// -- messages on screen ----------------------------------------------------------------------------

const actions = {
  edit: (index, text, node) => startEdit(index, text, node),
  regenerate: () => regenerate().catch(fail),
};

function render() {
  if (!state.messages.length) {
    emptyState($("messages"), "Ask anything.");
    return;
  }
  renderConversation($("messages"), state.messages, state.metas, actions);
}

let frame = 0;
function renderSoon() {
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); scrollDown(); });
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function banner(text, kind = "info") {
  const node = $("banner");
  node.textContent = text;
  node.className = kind;
  node.hidden = !text;
}

function fail(error) {
  if (error instanceof ApiError && error.status === 401) {
    askKey("The server refused the API key. Enter the key it was started with (--api-key).")
      .then((given) => given && boot());
    return;
  }
  banner(error.message || String(error), "error");
}

// -- models ---------------------------------------------------------------------------------------

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function takesImages() {
  const model = currentModel();
  return Boolean(model && (model.input_modalities || []).includes("image"));
}

async function loadModels() {
  const { data } = await call("GET", "/v1/models");
  state.models = data.filter((m) => m.type !== "embedding");
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => Object.assign(document.createElement("option"), { value: m.id, textContent: m.id })));
  const remembered = localStorage.getItem(MODEL_STORAGE);
  if (state.models.some((m) => m.id === remembered)) select.value = remembered;
  modelChanged();
}

function modelChanged() {
  localStorage.setItem(MODEL_STORAGE, $("model").value);
  const images = takesImages();
  $("attach").disabled = !images;
  $("attach").title = images ? "Attach an image" : `${$("model").value} takes text only: no images`;
  $("model-note").textContent = !state.models.length ? "no chat model" : images ? "takes images" : "text only";
  if (!images && state.attachments.length) {
    state.attachments = [];
    renderAttachments();
  }
}

// -- images ---------------------------------------------------------------------------------------

function renderAttachments() {
  const strip = $("attachments");
  strip.replaceChildren(...state.attachments.map((url, i) => {
    const item = document.createElement("span");
    item.className = "attachment";
    const img = Object.assign(document.createElement("img"), { src: url, alt: `image ${i + 1}` });
    const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "✕", title: "Remove" });
    remove.className = "icon small";
    remove.addEventListener("click", () => { state.attachments.splice(i, 1); renderAttachments(); });
    item.append(img, remove);
    return item;
  }));
}

function attachFiles(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (!images.length) return;
  if (!takesImages()) {
    banner(`${$("model").value} takes text only: images cannot be sent to it.`, "error");
    return;
  }
  for (const file of images) {
    if (file.size > MAX_IMAGE_BYTES) {
      banner(`${file.name} is larger than ${MAX_IMAGE_BYTES >> 20} MiB.`, "error");
      continue;
    }
    const reader = new FileReader();
    reader.addEventListener("load", () => { state.attachments.push(reader.result); renderAttachments(); });
    reader.readAsDataURL(file);
  }
}

// -- sending --------------------------------------------------------------------------------------

function wire(messages) {
  const system = state.system.trim() ? [{ role: "system", content: state.system }] : [];
  return [...system, ...messages.map((m) => Object.fromEntries(WIRE_FIELDS.filter((k) => m[k] !== undefined).map((k) => [k, m[k]])))];
}

function stored() {
  return state.system.trim() ? [{ role: "system", content: state.system }, ...state.messages] : state.messages;
}

function busy(running) {
  $("send").hidden = running;
  $("stop").hidden = !running;
  document.body.classList.toggle("busy", running);
}

async function send() {
  if (state.controller) return;
  const text = $("prompt").value;
  if (!text.trim() && !state.attachments.length) return;
  const content = state.attachments.length ? [{ type: "text", text },
    ...state.attachments.map((url) => ({ type: "image_url", image_url: { url } }))] : text;
  const attachments = state.attachments;
  state.messages.push({ role: "user", content });
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
  resizePrompt();
  const answered = await generate();
  if (!answered) { // refused before any answer: the message goes back to the box, as it was
    state.messages.pop();
    $("prompt").value = text;
    state.attachments = attachments;
    renderAttachments();
    render();
  }
}

// Streams an answer to state.messages; true when the turn stands (answered, or stopped after some text).
async function generate() {
  let fields;
  try {
    fields = requestFields(state.settings);
  } catch (error) {
    banner(`Settings: ${error.message}`, "error");
    return false;
  }
  const body = { model: $("model").value, messages: wire(state.messages), ...fields };
  const answer = { role: "assistant", content: "" };
  const meta = { streaming: true };
  state.messages.push(answer);
  state.metas.set(answer, meta);
  banner("");
  render();
  scrollDown();
  state.controller = new AbortController();
  busy(true);
  const started = performance.now();
  let first = null;
  try {
    for await (const chunk of streamChat(body, state.controller.signal)) {
      if (chunk.usage) meta.tokens = chunk.usage.completion_tokens;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (first === null && (delta.content || delta.reasoning_content || delta.tool_calls || delta.mcp_calls)) {
        first = performance.now();
        meta.ttft = first - started;
      }
      applyDelta(answer, delta);
      if (choice.finish_reason) meta.finish = choice.finish_reason;
      renderSoon();
    }
  } catch (error) {
    if (error.name === "AbortError") {
      meta.stopped = true;
    } else {
      state.messages.pop();
      meta.streaming = false;
      fail(error);
      if (!answer.content) return false;
      state.messages.push(answer);
    }
  } finally {
    state.controller = null;
    busy(false);
  }
  meta.streaming = false;
  meta.seconds = (performance.now() - started) / 1000;
  render();
  scrollDown();
  await save();
  return true;
}

function applyDelta(answer, delta) {
  if (delta.content) answer.content += delta.content;
  if (delta.reasoning_content) answer.reasoning_content = (answer.reasoning_content || "") + delta.reasoning_content;
  for (const call of delta.mcp_calls || []) (answer.mcp_calls ||= []).push(call);
  for (const call of delta.tool_calls || []) {
    const calls = (answer.tool_calls ||= []);
    const slot = calls[call.index] ||= { id: "", type: "function", function: { name: "", arguments: "" } };
    if (call.id) slot.id = call.id;
    if (call.function) {
      slot.function.name += call.function.name || "";
      slot.function.arguments += call.function.arguments || "";
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

async function regenerate() {
  if (state.controller) return;
  const lastUser = state.messages.map((m) => m.role).lastIndexOf("user");
  if (lastUser < 0) return;
  state.messages.splice(lastUser + 1);
  await generate();
}

function startEdit(index, text, node) {
  if (state.controller) return;
  const editor = document.createElement("form");
  editor.className = "editor";
  const area = Object.assign(document.createElement("textarea"), { value: text, rows: 3 });
  area.setAttribute("aria-label", "Edit the message");
  const ok = Object.assign(document.createElement("button"), { type: "submit", textContent: "Send as a new branch" });
  ok.className = "primary";
  const cancel = Object.assign(document.createElement("button"), { type: "button", textContent: "Cancel" });
  cancel.addEventListener("click", render);
  editor.append(area, ok, cancel);
  editor.addEventListener("submit", (event) => {
    event.preventDefault();
    branch(index, area.value).catch(fail);
  });
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); editor.requestSubmit(); }
  });
  node.replaceChildren(editor);
  area.focus();
}

// The conversation up to message `index`, with that message rewritten, as a new conversation (the
// original stays as it was).
async function branch(index, text) {
  const old = state.messages[index];
  const content = Array.isArray(old.content)
    ? [{ type: "text", text }, ...old.content.filter((part) => part.type !== "text")] : text;
  state.messages = [...state.messages.slice(0, index), { ...old, content }];
  state.conversationId = null;
  delete document.body.dataset.conversation;
  await generate();
}

// -- conversations -----------------------------------------------------------------------------------

async function save() {
  const body = { model: $("model").value, messages: stored() };
  document.body.dataset.saving = "true";
  try {
    if (state.conversationId === null) {
      state.conversationId = (await call("POST", CONVERSATIONS, body)).id;
    } else {
      await call("PUT", `${CONVERSATIONS}/${state.conversationId}`, body);
    }
    document.body.dataset.conversation = String(state.conversationId);
    await sidebar.refresh();
  } catch (error) {
    fail(new Error(`The conversation was not saved: ${error.message}`));
  } finally {
    delete document.body.dataset.saving;
  }
}

async function openConversation(id) {
  if (state.controller) stop();
  const conversation = await call("GET", `${CONVERSATIONS}/${id}`);
  const messages = conversation.messages;
  const system = messages.length && messages[0].role === "system" ? messages.shift() : null;
  state.system = system ? textOf(system.content) : state.settings.system;
  state.messages = messages;
  state.conversationId = conversation.id;
  document.body.dataset.conversation = String(conversation.id);
  if (state.models.some((m) => m.id === conversation.model)) {
    $("model").value = conversation.model;
    modelChanged();
  }
  closeSidebar();
  banner("");
  render();
  scrollDown();
  await sidebar.refresh();
}

function newChat() {
  if (state.controller) stop();
  state.conversationId = null;
  delete document.body.dataset.conversation;
  state.messages = [];
  state.system = state.settings.system;
  closeSidebar();
  render();
  sidebar.refresh().catch(fail);
  $("prompt").focus();
}

// -- wiring -----------------------------------------------------------------------------------------

function resizePrompt() {
  const area = $("prompt");
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight, 240)}px`;
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
}

function wireEvents() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send().catch(fail); });
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("input", resizePrompt);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send().catch(fail);
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) { event.preventDefault(); stop(); }
  });
  $("prompt").addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.some((f) => f.type.startsWith("image/"))) { event.preventDefault(); attachFiles(files); }
  });
  const main = $("main");
  main.addEventListener("dragover", (event) => { event.preventDefault(); main.classList.add("dragging"); });
  main.addEventListener("dragleave", () => main.classList.remove("dragging"));
  main.addEventListener("drop", (event) => {
    event.preventDefault();
    main.classList.remove("dragging");
    attachFiles(event.dataTransfer.files);
  });
  $("attach").addEventListener("click", () => $("attach-file").click());
  $("attach-file").addEventListener("change", () => { attachFiles($("attach-file").files); $("attach-file").value = ""; });
  $("model").addEventListener("change", modelChanged);
  $("new-chat").addEventListener("click", newChat);
  $("theme").addEventListener("click", toggleTheme);
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
  $("close-sidebar").addEventListener("click", closeSidebar);
  $("key-button").addEventListener("click", () => askKey("The API key for this server, kept in this browser only.")
    .then((given) => given && boot()));
  $("settings-button").addEventListener("click", async () => {
    const settings = await editSettings({ ...state.settings, system: state.system });
    if (!settings) return;
    state.settings = settings;
    state.system = settings.system;
  });
}

async function waitUntilReady() {
  for (;;) {
    const response = await fetch("/health").catch(() => null);
    if (response && response.ok) return banner("");
    const body = response ? await response.json().catch(() => ({})) : {};
    if (body.status === "failed") return banner(`The model failed to load: ${body.reason}`, "error");
    banner(body.status === "loading" ? "The model is loading…" : "Waiting for the server…");
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function boot() {
  try {
    await loadModels();
    await sidebar.refresh();
    render();
    document.body.dataset.ready = "true";
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      const reason = getKey() ? "The server refused the saved API key. Enter the key it was started with."
        : "This server needs an API key (the one given to levante serve --api-key). It is kept in this browser only.";
      if (await askKey(reason)) return boot();
      banner("No API key: nothing can be sent.", "error");
      return;
    }
    fail(error);
  }
}

applyTheme(currentTheme());
wireEvents();
loadLibraries().then((loaded) => {
  $("plain-note").hidden = loaded;
  applyTheme(currentTheme());
  render();
});
waitUntilReady().then(boot);
