// Swagger UI for levante's API, offline (its files come from the fastapi-offline package). With
// --api-key, the key is the one the chat page keeps in this browser, or asked for once here.
"use strict";

const KEY_STORAGE = "levante.apiKey";

async function fetchSchema() {
  for (;;) {
    const key = localStorage.getItem(KEY_STORAGE) || "";
    const response = await fetch("/openapi.json", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (response.status !== 401) return response.json();
    const given = window.prompt("This server needs an API key (levante serve --api-key). It is kept in this browser.");
    if (!given) throw new Error("no API key");
    localStorage.setItem(KEY_STORAGE, given.trim());
  }
}

fetchSchema().then((spec) => {
  window.ui = window.SwaggerUIBundle({
    spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    requestInterceptor: (request) => {
      const key = localStorage.getItem(KEY_STORAGE);
      if (key) request.headers.Authorization = `Bearer ${key}`;
      return request;
    },
  });
}).catch((error) => {
  document.getElementById("swagger-ui").textContent = `The API schema could not be loaded: ${error.message}`;
});
