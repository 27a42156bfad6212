// Typeset the math that pymdownx.arithmatex (generic mode) wraps in
// `.arithmatex` elements as \( ... \) and \[ ... \], with the KaTeX copy
// under assets/katex/ (no CDN: the site reads offline). `document$` is
// mkdocs-material's page observable, so instant navigation re-renders too.
document$.subscribe(({ body }) => {
  for (const element of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
