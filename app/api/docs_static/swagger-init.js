// Swagger UI's set-up for /api/v1/docs (app/api/docs.py), in a file of its own: the edge's
// CSP for HTML runs no inline script. The document's URL is the page's to say.
"use strict";

const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  domNode: root,
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // No badge fetched from validator.swagger.io: the page asks nothing of another origin.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
