// Sampling settings, theme and the API key dialog, kept in this browser's localStorage.

import { setKey } from "./api.js";

const SETTINGS_STORAGE = "levante.settings";
const THEME_STORAGE = "levante.theme";
export const DEFAULTS = { system: "", temperature: 0.7, top_p: 0.9, max_tokens: 512, seed: "", extra: "" };

export function loadSettings() {
  try {
    return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}") };
  } catch (_) {
    return { ...DEFAULTS };
  }
}

// The request fields these settings ask for (an error names a field that cannot be sent).
export function requestFields(settings) {
  const fields = {};
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    const value = settings[name];
    if (value === "" || value === null || value === undefined) continue;
    const number = Number(value);
    if (!Number.isFinite(number)) throw new Error(`${name}: not a number`);
    fields[name] = name === "max_tokens" || name === "seed" ? Math.trunc(number) : number;
  }
  if (settings.extra && settings.extra.trim()) {
    let extra;
    try {
      extra = JSON.parse(settings.extra);
    } catch (error) {
      throw new Error(`more request fields: not JSON (${error.message})`);
    }
    if (!extra || typeof extra !== "object" || Array.isArray(extra)) throw new Error("more request fields: must be a JSON object");
    Object.assign(fields, extra);
  }
  return fields;
}

// Shows a modal dialog whose one submit button (Save) is its default: Enter in a field saves, Cancel and
// Escape close it with returnValue "cancel" (a Cancel that were a submit button, first in the form,
// would be the default button, and Enter would cancel).
function openDialog(dialog) {
  dialog.returnValue = "";
  for (const button of dialog.querySelectorAll(".dialog-cancel")) button.onclick = () => dialog.close("cancel");
  dialog.showModal();
}

// Opens the settings dialog on `current`; resolves to the new settings, or null when cancelled.
export function editSettings(current) {
  const dialog = document.getElementById("settings");
  const form = document.getElementById("settings-form");
  const error = document.getElementById("settings-error");
  const fill = (values) => {
    for (const [name, value] of Object.entries(values)) if (form.elements[name]) form.elements[name].value = value ?? "";
  };
  fill(current);
  error.hidden = true;
  document.getElementById("settings-reset").onclick = () => fill({ ...DEFAULTS, system: form.elements.system.value });
  const save = document.getElementById("settings-save");
  save.onclick = (event) => {
    try {
      requestFields(read());
    } catch (problem) {
      event.preventDefault();
      error.textContent = problem.message;
      error.hidden = false;
    }
  };
  const read = () => Object.fromEntries(Object.keys(DEFAULTS).map((name) => [name, form.elements[name].value]));
  openDialog(dialog);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "save") return resolve(null);
      const settings = read();
      localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(settings));
      resolve(settings);
    }, { once: true });
  });
}

// Asks for the API key (saying why); resolves to true when one was given.
export function askKey(reason) {
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  document.getElementById("key-reason").textContent = reason;
  form.elements.key.value = "";
  openDialog(dialog);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = form.elements.key.value.trim();
      if (dialog.returnValue !== "save" || !key) return resolve(false);
      setKey(key);
      resolve(true);
    }, { once: true });
  });
}

export function applyTheme(theme) {
  const dark = theme ? theme === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  const light = document.getElementById("hl-light");
  const darkSheet = document.getElementById("hl-dark");
  if (light) light.disabled = dark;
  if (darkSheet) darkSheet.disabled = !dark;
}

export function currentTheme() {
  return localStorage.getItem(THEME_STORAGE) || "";
}

export function toggleTheme() {
  const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  localStorage.setItem(THEME_STORAGE, next);
  applyTheme(next);
}
