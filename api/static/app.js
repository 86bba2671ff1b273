// The web page: key once (sessionStorage), upload, poll, show the result. No build step, no libraries.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "xso-api-key";
  let texts = {};
  let overlayUrls = [];

  const key = () => sessionStorage.getItem(KEY) || "";
  const authHeaders = () => ({ Authorization: "Bearer " + key() });
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function loadTexts(language) {
    const response = await fetch("/v1/texts/" + language);
    if (!response.ok) return;
    texts = await response.json();
    document.documentElement.lang = texts.language || language;
    document.documentElement.dir = texts.dir === "rtl" ? "rtl" : "ltr";  // Persian and Arabic read right to left
    document.title = texts.title;
    if (texts.accept) $("image").accept = texts.accept;  // the formats the intake takes (contract/formats.py)
    document.querySelectorAll("[data-text]").forEach((node) => {
      const value = texts[node.dataset.text];
      if (typeof value === "string") node.textContent = value;
    });
  }

  function show(id, visible) { $(id).hidden = !visible; }

  function showKeyState() {
    const has = key() !== "";
    show("key-form", !has);
    show("upload-form", has);
  }

  function problem(text) {
    show("progress", false);
    $("problem-text").textContent = text;
    show("problem", true);
    $("submit").disabled = false;
  }

  async function problemText(response) {
    try {
      const body = await response.json();
      return body.detail || body.title || String(response.status);
    } catch (error) {
      return texts.internal_error || "Error " + response.status;
    }
  }

  function progress(status) {
    show("progress", true);
    $("progress-text").textContent = status === "processing" ? texts.processing : texts.queued || texts.received;
  }

  function percent(p) { return (100 * p).toFixed(p < 0.1 ? 1 : 0) + "%"; }

  function renderFindings(result) {
    const list = $("findings");
    list.replaceChildren();
    const shown = (result.findings || []).filter((f) => result.mode === "clinician" || f.eligible);
    shown.forEach((f) => {
      const item = document.createElement("li");
      if (f.positive) item.className = "flagged";
      const name = document.createElement("span");
      name.textContent = (texts.findings && texts.findings[f.label]) || f.label;
      if (f.positive) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = texts.flagged;
        name.append(tag);
      }
      const p = document.createElement("span");
      p.className = "p";
      p.textContent = percent(f.probability);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.style.width = Math.round(100 * f.probability) + "%";
      bar.append(fill);
      item.append(name, p, bar);
      list.append(item);
    });
    show("findings-block", shown.length > 0);
  }

  async function renderOverlays(overlays) {
    const box = $("overlays");
    overlayUrls.forEach((url) => URL.revokeObjectURL(url));
    overlayUrls = [];
    box.replaceChildren();
    for (const overlay of overlays) {
      const response = await fetch(overlay.url, { headers: authHeaders() });
      if (!response.ok) continue;
      const url = URL.createObjectURL(await response.blob());
      overlayUrls.push(url);
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = url;
      img.alt = overlay.caption.split("\n")[0];
      const caption = document.createElement("figcaption");
      caption.textContent = overlay.caption;
      figure.append(img, caption);
      box.append(figure);
    }
    show("overlays-block", box.children.length > 0);
  }

  async function renderResult(doc) {
    show("progress", false);
    if (doc.status === "failed") { problem(doc.error ? doc.error.detail : texts.internal_error); return; }
    const result = doc.result;
    const lines = (result.message || "").split("\n");
    const physicianLine = lines.length && lines[lines.length - 1].includes(texts.physician) ? lines.pop() : "";
    const verdictIndex = result.outcome === "analysed" ? 1 : 0;
    const verdict = lines.splice(verdictIndex, 1)[0] || "";
    $("verdict").textContent = verdict;
    $("verdict").className = "verdict " + (result.verdict || "");
    $("message").textContent = lines.join("\n").trim();
    $("physician").textContent = physicianLine.replace(/^\s+|\s+$/g, "");
    show("physician", physicianLine !== "");
    renderFindings(result);
    await renderOverlays(doc.overlays || []);
    show("result", true);
    $("result-heading").focus();
    $("submit").disabled = false;
  }

  async function poll(url) {
    for (let attempt = 0; attempt < 600; attempt++) {
      const response = await fetch(url, { headers: authHeaders() });
      if (!response.ok) { problem(await problemText(response)); return; }
      const doc = await response.json();
      if (doc.status === "succeeded" || doc.status === "failed") { await renderResult(doc); return; }
      progress(doc.status);
      await sleep(attempt < 20 ? 250 : 1000);
    }
    problem(texts.service_unavailable);
  }

  async function submit(event) {
    event.preventDefault();
    const file = $("image").files[0];
    if (!file) return;
    if (!key()) { problem(texts.key_missing); return; }
    show("problem", false);
    show("result", false);
    $("submit").disabled = true;
    const form = new FormData();
    form.append("image", file);
    form.append("mode", document.querySelector("input[name=mode]:checked").value);
    form.append("language", $("language").value);
    progress("queued");
    let response;
    try {
      response = await fetch("/v1/analyses", { method: "POST", headers: authHeaders(), body: form });
    } catch (error) {
      problem(texts.service_unavailable);
      return;
    }
    if (response.status === 401) { sessionStorage.removeItem(KEY); showKeyState(); }
    if (response.status !== 202) { problem(await problemText(response)); return; }
    const doc = await response.json();
    await poll(doc.url);
  }

  document.addEventListener("DOMContentLoaded", async () => {
    // every language the page offers is an <option> of #language; a regional tag (pt-BR) picks its language
    const offered = Array.from($("language").options, (option) => option.value);
    const preferred = (sessionStorage.getItem("xso-language") || navigator.language || "en").toLowerCase().split(/[-_]/)[0];
    $("language").value = offered.includes(preferred) ? preferred : "en";
    await loadTexts($("language").value);
    showKeyState();
    $("language").addEventListener("change", async () => {
      sessionStorage.setItem("xso-language", $("language").value);
      await loadTexts($("language").value);
    });
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("key").value.trim();
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      $("key").value = "";
      showKeyState();
      $("image").focus();
    });
    $("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); showKeyState(); $("key").focus(); });
    $("upload-form").addEventListener("submit", submit);
    $("again").addEventListener("click", () => {
      show("result", false);
      $("image").value = "";
      $("image").focus();
    });
  });
})();
