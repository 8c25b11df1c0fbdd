// Model output -> DOM. The text is untrusted: markdown is parsed by marked with every piece of raw
// HTML escaped (it is shown, never rendered), the result goes through DOMPurify (a second wall: only
// plain formatting tags, links only to http(s) and mailto), and code is highlighted by highlight.js.
// No HTML string is ever given to the DOM as markup: the page's Trusted Types policy would refuse it. Without the vendored libraries (`make web` not run), text is
// shown as plain text (textContent), and the page says how to get markdown.

const VENDOR = "/ui/vendor/";
let libs = null; // { marked, purify, hljs } once loaded; false when they are not there

const FORBID_TAGS = ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame",
  "object", "embed", "svg", "math", "link", "meta", "base", "audio", "video", "source", "dialog"];

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

export async function loadLibraries() {
  if (libs !== null) return libs !== false;
  try {
    const [markedModule, purifyModule, hljsModule] = await Promise.all([
      import(VENDOR + "marked.esm.js"), import(VENDOR + "purify.es.mjs"), import(VENDOR + "highlight.es.min.js")]);
    const marked = new markedModule.Marked({ gfm: true, breaks: false });
    marked.use({ renderer: { html: (token) => escapeHtml(token.text) } });
    const purify = purifyModule.default(window);
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
    libs = { marked, purify, hljs: hljsModule.default };
    for (const [id, file] of [["hl-light", "highlight-light.css"], ["hl-dark", "highlight-dark.css"]]) {
      const link = Object.assign(document.createElement("link"), { rel: "stylesheet", href: VENDOR + file, id });
      document.head.append(link);
    }
  } catch (_) {
    libs = false;
  }
  return libs !== false;
}

function sanitize(html) {
  return libs.purify.sanitize(html, {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS,
    FORBID_ATTR: ["style", "srcset", "action", "formaction", "xlink:href"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
  });
}

// Renders `text` (markdown) into `element`, replacing what was there.
export function renderMarkdown(element, text) {
  if (!libs) {
    element.classList.add("plain");
    element.textContent = text;
    return;
  }
  const fragment = sanitize(libs.marked.parse(text));
  for (const code of fragment.querySelectorAll("pre > code")) decorateCode(code);
  element.replaceChildren(fragment);
}

function decorateCode(code) {
  const match = /language-([\w+#.-]+)/.exec(code.className);
  const language = match && libs.hljs.getLanguage(match[1]) ? match[1] : null;
  const source = code.textContent;
  const highlighted = language ? libs.hljs.highlight(source, { language }) : libs.hljs.highlightAuto(source);
  code.className = "hljs";
  code.replaceChildren(sanitize(highlighted.value)); // spans with classes, through the same wall
  const pre = code.parentElement;
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = language || "";
  bar.append(label, copyButton(() => code.textContent, "Copy code"));
  pre.before(bar);
  const wrapper = document.createElement("div");
  wrapper.className = "code";
  bar.before(wrapper);
  wrapper.append(bar, pre);
}

export function copyButton(getText, title = "Copy") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.title = title;
  button.addEventListener("click", async () => {
    await copyText(getText());
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1200);
  });
  return button;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) { // no clipboard API (a plain-http page on another host): the old way
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}
