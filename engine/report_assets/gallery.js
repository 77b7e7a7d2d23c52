// distill3d gallery: filter the batch grid by text (name, prompt, error) and by status.
(function () {
  "use strict";
  function apply(root) {
    const text = (root.querySelector(".filter-text").value || "").toLowerCase();
    const status = root.querySelector(".filter-status button.active").dataset.status;
    let shown = 0;
    root.querySelectorAll(".card").forEach((card) => {
      const ok = (status === "all" || card.dataset.status === status) && card.dataset.search.includes(text);
      card.hidden = !ok;
      if (ok) shown++;
    });
    root.querySelector(".filter-count").textContent = shown + " shown";
  }
  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll(".gallery").forEach((root) => {
      root.querySelector(".filter-text").addEventListener("input", () => apply(root));
      root.querySelectorAll(".filter-status button").forEach((button) => button.addEventListener("click", () => {
        root.querySelectorAll(".filter-status button").forEach((b) => b.classList.toggle("active", b === button));
        apply(root);
      }));
      apply(root);
    });
  });
})();
