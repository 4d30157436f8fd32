// Renders /openapi.json with the vendored Swagger UI (served at /docs).
// A file of its own, not an inline script: the page's CSP allows 'self' only.
"use strict";
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // Off: its default posts the document to validator.swagger.io (for any
    // host but localhost) and shows that site's badge; nothing leaves here.
    validatorUrl: null,
    // "Try it out" calls this server, which the CSP's connect-src 'self' allows.
    tryItOutEnabled: false,
  });
});
