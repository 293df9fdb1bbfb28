// dfsnet search page: pick, drop or paste an image (POST api/search), select a result to search by it
// (GET api/similar/{id}, no upload), or browse the collection page by page (GET api/images).
"use strict";

const $ = (id) => document.getElementById(id);
const fileInput = $("file-input");
const dropzone = $("dropzone");
const preview = $("query-preview");
const caption = $("query-caption");
const kInput = $("k-input");
const rerankInput = $("rerank-input");
const statusLine = $("status");
const errorLine = $("error");
const results = $("results");
const heading = $("results-heading");
const pager = $("pager");

// Images per page when browsing; ?page_size=N in the page's URL changes it (1-100).
const PAGE_SIZE = Math.min(100, Math.max(1, Number(new URLSearchParams(location.search).get("page_size")) || 24));
// What the results show: {kind: "upload", file} | {kind: "similar", id, name} | {kind: "browse", offset}
let current = null;
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

async function fetchJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorMessage(body, response.status));
  return body;
}

async function loadInfo() {
  try {
    const info = await fetchJson("api/info");
    $("index-info").textContent =
      `${info.count.toLocaleString()} images · ${info.bits}-bit codes · ${info.backbone}` +
      (info.supervised ? "" : " (pretrained, no labels)") + (info.has_features ? " · float features stored" : "");
    kInput.max = String(info.max_k);
    rerankInput.disabled = !info.has_features;
    if (!info.has_features) rerankInput.parentElement.title = "this index stores no float features";
  } catch (err) {
    $("index-info").textContent = `index information unavailable: ${err.message}`;
  }
}

// One card: the thumbnail is a button that searches by this image ("more like this").
function card(entry, lines) {
  const item = document.createElement("li");
  item.dataset.id = String(entry.id);
  const button = document.createElement("button");
  button.type = "button";
  button.className = "similar";
  button.title = `more like this: ${entry.name}`;
  button.setAttribute("aria-label", `more like ${entry.name}`);
  const img = document.createElement("img");
  img.src = entry.thumbnail_url;
  img.alt = entry.name;
  img.loading = "lazy";
  img.decoding = "async";
  button.appendChild(img);
  button.addEventListener("click", () => searchSimilar(entry.id, entry.name, entry.thumbnail_url));
  item.appendChild(button);

  const meta = document.createElement("div");
  meta.className = "meta";
  for (const [cls, text, title] of lines) {
    const line = document.createElement("div");
    line.className = cls;
    line.textContent = text;
    if (title) line.title = title;
    meta.appendChild(line);
  }
  if (entry.label !== null && entry.label !== undefined) {
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    meta.appendChild(label);
  }
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = entry.name;
  name.title = entry.name;
  meta.appendChild(name);
  item.appendChild(meta);
  return item;
}

function renderHits(hits, queryId) {
  results.replaceChildren();
  for (const hit of hits) {
    let text = `#${hit.rank} · distance ${hit.distance}`;
    let title = "Hamming distance between the binary codes";
    if (hit.score !== null && hit.score !== undefined) {
      // Re-ranked: the order follows the Euclidean distance of the float features.
      text += ` · L2 ${hit.score.toFixed(2)}`;
      title += "; L2: Euclidean distance between the float features (the re-ranked order)";
    }
    const item = card(hit, [["rank", text, title]]);
    if (hit.id === queryId) item.classList.add("query");
    results.appendChild(item);
  }
}

function showQuery(src, text) {
  preview.src = src;
  preview.hidden = false;
  caption.textContent = text;
  caption.hidden = false;
}

async function run(describe, load) {
  const serial = ++requestSerial;
  showError("");
  statusLine.textContent = describe;
  const started = performance.now();
  try {
    const outcome = await load();
    if (serial !== requestSerial) return; // a newer request superseded this one
    outcome.render();
    statusLine.textContent = `${outcome.summary} in ${(performance.now() - started).toFixed(0)} ms`;
  } catch (err) {
    if (serial !== requestSerial) return;
    statusLine.textContent = "";
    results.replaceChildren();
    showError(err.message);
  }
}

function searchOptions() {
  return { k: kInput.value || "10", rerank: rerankInput.checked ? "true" : "false" };
}

function searchUpload(file) {
  current = { kind: "upload", file };
  pager.hidden = true;
  heading.textContent = "Results";
  run("searching…", async () => {
    const form = new FormData();
    const options = searchOptions();
    form.append("file", file, file.name || "query");
    form.append("k", options.k);
    form.append("rerank", options.rerank);
    const body = await fetchJson("api/search", { method: "POST", body: form });
    return { render: () => renderHits(body.hits, null),
             summary: `${body.hits.length} results of ${body.count.toLocaleString()}` };
  });
}

function searchSimilar(id, name, thumbnailUrl) {
  current = { kind: "similar", id, name, thumbnailUrl };
  pager.hidden = true;
  heading.textContent = `More like ${name}`;
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  showQuery(thumbnailUrl, `query: indexed image #${id} · ${name}`);
  $("drop-hint").textContent = "Drop, paste or choose another image";
  run("searching…", async () => {
    const params = new URLSearchParams(searchOptions());
    const body = await fetchJson(`api/similar/${encodeURIComponent(id)}?${params}`);
    return { render: () => renderHits(body.hits, id),
             summary: `${body.hits.length} results like #${id} of ${body.count.toLocaleString()}` };
  });
}

function browse(offset) {
  current = { kind: "browse", offset };
  heading.textContent = "The collection";
  run("loading…", async () => {
    const body = await fetchJson(`api/images?offset=${offset}&limit=${PAGE_SIZE}`);
    return {
      render: () => {
        results.replaceChildren(...body.items.map((item) => card(item, [["rank", `#${item.id}`, "id in the index"]])));
        const pages = Math.max(1, Math.ceil(body.count / PAGE_SIZE));
        const page = Math.floor(offset / PAGE_SIZE) + 1;
        $("page-info").textContent = `page ${page} of ${pages}`;
        $("prev-page").disabled = offset <= 0;
        $("next-page").disabled = offset + PAGE_SIZE >= body.count;
        pager.hidden = false;
      },
      summary: `images ${body.items.length ? offset + 1 : 0}–${offset + body.items.length} of ` +
               `${body.count.toLocaleString()}`,
    };
  });
}

function refresh() {
  if (!current) return;
  if (current.kind === "upload") searchUpload(current.file);
  else if (current.kind === "similar") searchSimilar(current.id, current.name, current.thumbnailUrl);
}

function useFile(file) {
  if (!file) return;
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  showQuery(URL.createObjectURL(file), `query: ${file.name || "pasted image"}`);
  $("drop-hint").textContent = file.name || "pasted image";
  searchUpload(file);
}

fileInput.addEventListener("change", () => useFile(fileInput.files[0]));
kInput.addEventListener("change", refresh);
rerankInput.addEventListener("change", refresh);
$("browse-button").addEventListener("click", () => browse(0));
$("prev-page").addEventListener("click", () => browse(Math.max(0, current.offset - PAGE_SIZE)));
$("next-page").addEventListener("click", () => browse(current.offset + PAGE_SIZE));

dropzone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    fileInput.click();
  }
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
