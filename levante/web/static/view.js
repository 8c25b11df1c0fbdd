// The conversation on screen: one element per message, built from the OpenAI messages themselves.
// User text is shown as text; assistant text as sanitized markdown (markdown.js); reasoning folded;
// tool and MCP calls as collapsible cards with their arguments and results. Every string from the
// model or the store reaches the DOM through textContent or the markdown renderer, nothing else.

import { copyButton, renderMarkdown } from "./markdown.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, title, onClick) {
  const node = el("button", "action", label);
  node.type = "button";
  node.title = title;
  node.addEventListener("click", onClick);
  return node;
}

export function textOf(content) {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content.filter((part) => part && part.type === "text").map((part) => part.text || "").join("\n");
}

function imagesOf(content) {
  if (!Array.isArray(content)) return [];
  return content.filter((part) => part && part.type === "image_url" && part.image_url)
    .map((part) => part.image_url.url || "");
}

function pretty(json) {
  try {
    return JSON.stringify(JSON.parse(json), null, 2);
  } catch (_) {
    return String(json ?? "");
  }
}

// A collapsible card: a tool the model called (`kind` "tool") or one the server ran over MCP ("mcp").
export function callCard(kind, name, server, argumentsJson, result, isError) {
  const card = el("details", `card ${kind}${isError ? " failed" : ""}`);
  const summary = el("summary");
  summary.append(el("span", "card-kind", kind === "mcp" ? "MCP" : "tool"), el("span", "card-name", name));
  if (server) summary.append(el("span", "muted", `· ${server}`));
  summary.append(el("span", "card-state", result === undefined ? "…" : isError ? "failed" : "done"));
  card.append(summary, el("div", "card-label", "Arguments"), el("pre", "card-arguments", pretty(argumentsJson)));
  if (result !== undefined) card.append(el("div", "card-label", "Result"), el("pre", "card-result", String(result)));
  return card;
}

function reasoningBlock(text, streaming) {
  const details = el("details", "reasoning");
  details.append(el("summary", "", streaming ? "Thinking…" : "Reasoning"));
  const body = el("div", "reasoning-text");
  body.textContent = text;
  details.append(body);
  return details;
}

// A streaming answer is drawn anew at every delta: what the reader unfolded (`key`) stays unfolded.
function keepOpen(details, meta, key) {
  const open = (meta.unfolded ||= new Set());
  details.open = open.has(key);
  details.addEventListener("toggle", () => (details.open ? open.add(key) : open.delete(key)));
  return details;
}

// The element for messages[index]; `tools` maps tool_call_id -> the tool message answering it,
// `meta` holds what the page knows beyond the message (timings, stopped, streaming), `actions` the
// handlers: edit(index, text), regenerate(), and `last` whether this is the last assistant turn.
export function messageElement(message, index, { tools, meta = {}, actions, last }) {
  const node = el("article", `message ${message.role}`);
  node.dataset.index = String(index);
  if (message.role === "user") {
    const text = textOf(message.content);
    node.append(el("div", "bubble user-text", text));
    const images = imagesOf(message.content);
    if (images.length) {
      const strip = el("div", "images");
      for (const url of images) { // only images carried in the message itself; a URL or path is named, not fetched
        strip.append(url.startsWith("data:image/") ? Object.assign(el("img"), { src: url, alt: "attached image" })
          : el("span", "image-ref", `image: ${url}`));
      }
      node.append(strip);
    }
    const bar = el("div", "actions");
    bar.append(button("Edit", "Edit this message and branch from here", () => actions.edit(index, text, node)));
    node.append(bar);
    return node;
  }
  if (message.role === "tool") { // shown inside its call's card; alone only when no call asked for it
    node.append(callCard("tool", message.name || "tool result", "", "{}", message.content, false));
    return node;
  }
  if (message.reasoning_content) {
    node.append(keepOpen(reasoningBlock(message.reasoning_content, meta.streaming), meta, "reasoning"));
  }
  (message.mcp_calls || []).forEach((call, n) => node.append(keepOpen(
    callCard("mcp", call.name, call.server, call.arguments, call.content, call.is_error), meta, `mcp ${n}`)));
  (message.tool_calls || []).forEach((call, n) => {
    const answer = tools.get(call.id);
    const fn = call.function || {};
    node.append(keepOpen(callCard("tool", fn.name || "", "", fn.arguments, answer ? answer.content : undefined, false),
      meta, `tool ${n}`));
  });
  const text = textOf(message.content);
  const calls = (message.tool_calls || []).length + (message.mcp_calls || []).length;
  if (text || !calls || meta.streaming) { // a turn that only called tools has no text to show
    const body = el("div", "bubble markdown");
    renderMarkdown(body, text);
    node.append(body);
  }
  if (text || !calls || last) node.append(footer(message, meta, actions, last));
  return node;
}

function footer(message, meta, actions, last) {
  const bar = el("div", "actions");
  const stats = [];
  if (meta.stopped) stats.push("stopped");
  if (meta.finish === "length") stats.push("cut at max tokens");
  if (meta.tokens && meta.seconds !== undefined) stats.push(`${meta.tokens} tokens in ${meta.seconds.toFixed(2)} s`);
  if (meta.ttft !== undefined) stats.push(`first token ${Math.round(meta.ttft)} ms`);
  const info = el("span", "muted stats", stats.join(" · "));
  if (meta.ttft !== undefined) info.dataset.ttftMs = String(meta.ttft);
  if (!meta.streaming) {
    bar.append(copyButton(() => textOf(message.content), "Copy the answer (markdown)"));
    if (last) bar.append(button("Regenerate", "Answer this again", () => actions.regenerate()));
  }
  bar.append(info);
  return bar;
}

// Replaces the children of `container` with the conversation `messages` (the system prompt is not shown).
export function renderConversation(container, messages, metas, actions) {
  const tools = new Map(messages.filter((m) => m.role === "tool" && m.tool_call_id).map((m) => [m.tool_call_id, m]));
  const answered = new Set(messages.flatMap((m) => (m.tool_calls || []).map((c) => c.id)));
  const lastAssistant = messages.map((m) => m.role).lastIndexOf("assistant");
  const nodes = [];
  messages.forEach((message, index) => {
    if (message.role === "system" || message.role === "developer") return;
    if (message.role === "tool" && answered.has(message.tool_call_id)) return;
    if (!metas.has(message)) metas.set(message, {});
    nodes.push(messageElement(message, index, { tools, meta: metas.get(message), actions, last: index === lastAssistant }));
  });
  container.replaceChildren(...nodes);
}

export function emptyState(container, text) {
  container.replaceChildren(el("div", "empty", text));
}
