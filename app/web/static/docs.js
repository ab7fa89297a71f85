// Starts Swagger UI on this app's schema. A file, not an inline script: the page's
// Content-Security-Policy runs scripts from this site only. validatorUrl null: Swagger UI
// would otherwise send the schema to validator.swagger.io.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.url,
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
