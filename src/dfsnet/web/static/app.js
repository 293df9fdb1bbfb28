// dfsnet search page: pick, drop or paste an image; POST it to api/search; show the hits.
"use strict";

const $ = (id) => document.getElementById(id);
const fileInput = $("file-input");
const dropzone = $("dropzone");
const preview = $("query-preview");
const kInput = $("k-input");
const rerankInput = $("rerank-input");
const statusLine = $("status");
const errorLine = $("error");
const results = $("results");

let currentFile = null;
let requestSerial = 0;

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = !message;
}

// FastAPI reports validation errors as a list of {loc, msg}; our own errors as a string.
function errorMessage(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `request failed with HTTP ${status}`;
}

async function loadInfo() {
  try {
    const response = await fetch("api/info");
    const info = await response.json();
    if (!response.ok) throw new Error(errorMessage(info, response.status));
    $("index-info").textContent =
      `${info.count.toLocaleString()} images · ${info.bits}-bit codes · ${info.backbone}` +
      (info.has_features ? " · float features stored" : "");
    kInput.max = String(info.max_k);
    rerankInput.disabled = !info.has_features;
    if (!info.has_features) rerankInput.parentElement.title = "this index stores no float features";
  } catch (err) {
    $("index-info").textContent = `index information unavailable: ${err.message}`;
  }
}

function renderHits(hits) {
  results.replaceChildren();
  for (const hit of hits) {
    const item = document.createElement("li");
    item.dataset.id = String(hit.id);

    const img = document.createElement("img");
    img.src = hit.thumbnail_url;
    img.alt = hit.name;
    img.loading = "lazy";
    img.decoding = "async";
    item.appendChild(img);

    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("div");
    rank.className = "rank";
    rank.textContent = `#${hit.rank} · distance ${hit.distance}`;
    rank.title = "Hamming distance between the binary codes";
    if (hit.score !== null && hit.score !== undefined) {
      // Re-ranked: the order follows the Euclidean distance of the float features.
      rank.textContent += ` · L2 ${hit.score.toFixed(2)}`;
      rank.title += "; L2: Euclidean distance between the float features (the re-ranked order)";
    }
    meta.appendChild(rank);
    if (hit.label !== null) {
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = hit.label;
      meta.appendChild(label);
    }
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = hit.name;
    name.title = hit.name;
    meta.appendChild(name);
    item.appendChild(meta);
    results.appendChild(item);
  }
}

async function search() {
  if (!currentFile) return;
  const serial = ++requestSerial;
  const form = new FormData();
  form.append("file", currentFile, currentFile.name || "query");
  form.append("k", kInput.value || "10");
  form.append("rerank", rerankInput.checked ? "true" : "false");
  showError("");
  statusLine.textContent = "searching…";
  try {
    const started = performance.now();
    const response = await fetch("api/search", { method: "POST", body: form });
    const body = await response.json().catch(() => null);
    if (serial !== requestSerial) return; // a newer query superseded this one
    if (!response.ok) throw new Error(errorMessage(body, response.status));
    renderHits(body.hits);
    const ms = (performance.now() - started).toFixed(0);
    statusLine.textContent = `${body.hits.length} results of ${body.count.toLocaleString()} in ${ms} ms`;
  } catch (err) {
    if (serial !== requestSerial) return;
    statusLine.textContent = "";
    results.replaceChildren();
    showError(err.message);
  }
}

function useFile(file) {
  if (!file) return;
  currentFile = file;
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").textContent = file.name || "pasted image";
  search();
}

fileInput.addEventListener("change", () => useFile(fileInput.files[0]));
kInput.addEventListener("change", search);
rerankInput.addEventListener("change", search);

dropzone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") fileInput.click();
});
for (const name of ["dragenter", "dragover"]) {
  dropzone.addEventListener(name, (event) => {
    event.preventDefault();
    dropzone.classList.add("dragover");
  });
}
for (const name of ["dragleave", "drop"]) {
  dropzone.addEventListener(name, () => dropzone.classList.remove("dragover"));
}
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  useFile(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const item = [...event.clipboardData.items].find((i) => i.kind === "file");
  if (item) useFile(item.getAsFile());
});

loadInfo();
