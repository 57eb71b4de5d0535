// The dashboard's only script: refresh the panels, look up an instance, send actions.
// Everything it inserts is HTML the server rendered with escaping, or plain text.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const panels = document.getElementById("panels");
  const updated = document.getElementById("updated");
  const flash = document.getElementById("flash");
  const refreshMs = Number(updated.dataset.refreshMs) || 2000;

  function say(text, problem) {
    flash.textContent = text;
    flash.className = problem ? "problem" : "";
  }

  async function refresh() {
    try {
      const response = await fetch("/ui/panels", { credentials: "same-origin" });
      if (response.status === 401) { window.location.assign("/ui/login"); return; }
      if (!response.ok) { updated.textContent = "refresh failed (" + response.status + ")"; return; }
      panels.innerHTML = await response.text();
      updated.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      updated.textContent = "node unreachable; retrying";
    }
  }

  async function post(path) {
    const response = await fetch(path, {
      method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
    });
    let body = {};
    try { body = await response.json(); } catch (error) { /* not JSON: keep the status */ }
    return { ok: response.ok, detail: body.detail || response.statusText };
  }

  document.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-action]");
    if (!button) { return; }
    if (button.dataset.action === "drain") {
      const node = button.dataset.node;
      if (!window.confirm("Drain node " + node + "? It stops claiming, finishes what it runs, and exits.")) { return; }
      const result = await post("/ui/nodes/" + encodeURIComponent(node) + "/drain");
      say(result.ok ? "drain requested for " + node : "drain failed: " + result.detail, !result.ok);
    } else if (button.dataset.action === "retry") {
      const id = button.dataset.instance;
      const result = await post("/ui/instances/" + encodeURIComponent(id) + "/retry");
      say(result.ok ? "instance " + id + " sent back to the queue" : "retry failed: " + result.detail, !result.ok);
    }
    refresh();
  });

  document.getElementById("lookup").addEventListener("submit", async function (event) {
    event.preventDefault();
    const id = document.getElementById("instance-id").value.trim();
    const response = await fetch("/ui/instances/" + encodeURIComponent(id), { credentials: "same-origin" });
    document.getElementById("instance").innerHTML = await response.text();
  });

  updated.textContent = "updated " + new Date().toLocaleTimeString();
  window.setInterval(refresh, refreshMs);
})();
