// The API reference at /docs: Swagger UI (swagger-ui-bundle.js, served by this server from
// the swagger-ui-bundle-v2 package) over /openapi.json. Nothing loads from other origins:
// no validator badge, no fonts; "Try it out" sends the console's API key, if one is kept.

import { storedKey } from "./keypanel.js";

/**
 * Swagger UI's example for a body whose schema is a $ref to a oneOf with a discriminator
 * (POST /v1/jobs: SubmitJob) leaves the discriminator ("type") out, an example the API
 * refuses. Seen through an allOf, the first variant is sampled whole. Only what this
 * page shows changes: /openapi.json stays as served.
 * @param {object} doc the OpenAPI document
 * @returns {object} the same document, request bodies wrapped
 */
function withWholeExamples(doc) {
  for (const item of Object.values(doc.paths || {})) {
    for (const op of Object.values(item)) {
      for (const media of Object.values(op?.requestBody?.content || {})) {
        if (media.schema?.$ref) media.schema = { allOf: [media.schema] };
      }
    }
  }
  return doc;
}

async function show() {
  const resp = await fetch("/openapi.json", { headers: { Accept: "application/json" } });
  if (!resp.ok) throw new Error(`GET /openapi.json answered HTTP ${resp.status}`);
  const ui = window.SwaggerUIBundle({
    spec: withWholeExamples(await resp.json()),
    dom_id: "#reference",
    deepLinking: true,
    validatorUrl: null, // the default sends the document to validator.swagger.io
    docExpansion: "list",
    defaultModelsExpandDepth: 0, // the schemas are under each operation, and listed last
    displayRequestDuration: true,
    filter: true,
    onComplete: () => {
      const key = storedKey();
      if (key) ui.preauthorizeApiKey("apiKey", key);
    },
  });
}

show().catch((err) => {
  const note = document.createElement("p");
  note.className = "reference-error";
  note.setAttribute("role", "alert");
  note.textContent = `The reference could not load (${err.message}): try the plain page.`;
  document.getElementById("reference").prepend(note);
});
