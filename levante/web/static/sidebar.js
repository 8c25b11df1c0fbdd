// The list of saved conversations (the server's store, shared with `levante chat`): open, search,
// rename, delete, export and import as JSON.

import { call } from "./api.js";

export const CONVERSATIONS = "/v1/levante/conversations";

function download(name, data) {
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const link = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function safeName(title, id) {
  const stem = (title || `conversation-${id}`).replace(/[^\w.-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 60);
  return `${stem || "conversation"}.json`;
}

export class Sidebar {
  // `hooks`: open(id), deleted(id), renamed(), failed(error), notice(text); `currentId()`: the open one.
  constructor(hooks, currentId) {
    this.hooks = hooks;
    this.currentId = currentId;
    this.list = document.getElementById("conversations");
    this.search = document.getElementById("search");
    this.query = "";
    let timer;
    this.search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => { this.query = this.search.value.trim(); this.refresh(); }, 200);
    });
    document.getElementById("export-all").addEventListener("click", () => this.exportAll().catch(hooks.failed));
    const file = document.getElementById("import-file");
    document.getElementById("import").addEventListener("click", () => file.click());
    file.addEventListener("change", () => {
      if (file.files.length) this.importFile(file.files[0]).catch(hooks.failed).finally(() => { file.value = ""; });
    });
  }

  async refresh() {
    const path = this.query ? `${CONVERSATIONS}?q=${encodeURIComponent(this.query)}` : CONVERSATIONS;
    const { data } = await call("GET", path);
    const items = data.map((row) => this.item(row));
    if (!items.length) {
      const empty = document.createElement("li");
      empty.className = "muted empty-list";
      empty.textContent = this.query ? "No conversation matches." : "No saved conversations yet.";
      items.push(empty);
    }
    this.list.replaceChildren(...items);
  }

  item(row) {
    const li = document.createElement("li");
    li.className = "conversation" + (row.id === this.currentId() ? " current" : "");
    li.dataset.id = String(row.id);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conversation-title";
    open.textContent = row.title || "(untitled)";
    open.title = `${row.title || "(untitled)"} · ${row.message_count} messages · ${row.model}`;
    open.addEventListener("click", () => this.hooks.open(row.id));
    const tools = document.createElement("span");
    tools.className = "conversation-tools";
    for (const [label, title, action] of [["✎", "Rename", () => this.rename(row)], ["⤓", "Export as JSON", () => this.exportOne(row)],
      ["✕", "Delete", () => this.remove(row)]]) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "icon small";
      b.textContent = label;
      b.title = title;
      b.setAttribute("aria-label", `${title}: ${row.title}`);
      b.addEventListener("click", () => action().catch(this.hooks.failed));
      tools.append(b);
    }
    li.append(open, tools);
    return li;
  }

  async rename(row) {
    const title = window.prompt("New title (empty: the first message)", row.title);
    if (title === null) return;
    await call("PATCH", `${CONVERSATIONS}/${row.id}`, { title });
    await this.refresh();
    this.hooks.renamed();
  }

  async remove(row) {
    if (!window.confirm(`Delete "${row.title || "(untitled)"}"?`)) return;
    await call("DELETE", `${CONVERSATIONS}/${row.id}`);
    await this.refresh();
    this.hooks.deleted(row.id);
  }

  async exportOne(row) {
    download(safeName(row.title, row.id), await call("GET", `${CONVERSATIONS}/${row.id}`));
  }

  async exportAll() {
    const { data } = await call("GET", `${CONVERSATIONS}?limit=1000`);
    const all = [];
    for (const row of data) all.push(await call("GET", `${CONVERSATIONS}/${row.id}`));
    download("levante-conversations.json", all);
  }

  async importFile(file) {
    let parsed;
    try {
      parsed = JSON.parse(await file.text());
    } catch (error) {
      throw new Error(`${file.name} is not JSON (${error.message})`);
    }
    const conversations = Array.isArray(parsed) ? parsed : [parsed];
    let imported = 0;
    for (const conversation of conversations) {
      await call("POST", CONVERSATIONS, conversation);
      imported += 1;
    }
    await this.refresh();
    this.hooks.notice(`Imported ${imported} conversation${imported === 1 ? "" : "s"} from ${file.name}.`);
  }
}
