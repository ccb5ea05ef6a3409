// The search page. Everything from the user or the index (captions, ids, labels, file names, error
// messages) goes into the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

// fetch + the server's JSON, or an Error carrying the server's own message.
async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: reported below
  }
  if (!response.ok) throw new Error(body && body.error ? body.error : `HTTP ${response.status} ${response.statusText}`);
  if (body === null) throw new Error("the server's answer is not JSON");
  return body;
}

function busy(on) {
  $("text-submit").disabled = on;
  $("drop").classList.toggle("disabled", on);
  document.body.setAttribute("aria-busy", String(on));
}

async function loadInfo() {
  try {
    info = await call("api/info");
  } catch (err) {
    $("info").textContent = "no index loaded";
    showError(`cannot load the index: ${err.message}`);
    return;
  }
  const clip = info.clip;
  $("info").textContent = `${info.count.toLocaleString()} items · ${info.bits}-bit codes · ${info.modalities.join(" + ")} codes · ` +
    `CLIP ${clip.clip_model} (weights: ${clip.pretrained}) · ${info.backend}`;
  if (info.notice) {
    $("banner").textContent = `${info.notice[0].toUpperCase()}${info.notice.slice(1)}.`;
    $("banner").hidden = false;
  }
  $("k").max = info.limits.max_k;
  $("k").value = info.limits.default_k;
  // A caption searches image codes; an image searches text codes.
  if (!info.modalities.includes("image")) disable($("text-form"), "this index holds no image codes: search it with an image");
  if (!info.modalities.includes("text")) disable($("drop"), "this index holds no caption codes: search it with a caption");
}

function disable(part, why) {
  part.querySelectorAll("input, button").forEach((node) => { node.disabled = true; });
  part.classList.add("disabled");
  part.dataset.disabled = "true";
  part.append(el("p", "info", why));
}

// What the query was: a caption or an image given, or an indexed item's own image or caption code.
const QUERY_NAMES = { text: "the caption", image: "the image", image_of: "the image of item", text_of: "the caption of item" };

function render(found) {
  $("grid").replaceChildren();
  $("captions").replaceChildren();
  const [[modality, query]] = Object.entries(found.query);
  const what = found.searched === "image" ? "images" : "captions";
  $("summary").textContent = `${found.results.length} nearest ${what} to ${QUERY_NAMES[modality]} "${query}" ` +
    `· k = ${$("k").value} · ${found.bits}-bit codes · Hamming distance, ties by database row`;
  // "More like this": results of the same kind, nearest to this row's other code (an image
  // result's caption code finds images; a caption result's image code finds captions).
  const similar = info && info.modalities.includes("image") && info.modalities.includes("text");
  for (const r of found.results) {
    const meta = el("div", "meta");
    meta.append(el("span", "rank", `#${r.rank}`), el("span", "distance", `distance ${r.distance}`), el("span", "id", r.id));
    const labels = el("div", "labels", (r.labels || []).length ? `labels: ${r.labels.join(", ")}` : "no labels");
    if (similar) meta.append(moreLikeThis(r.row, found.searched));
    if (found.searched === "image") {
      const card = el("figure", "card result");
      const img = el("img");
      img.alt = `result ${r.rank}: ${r.id}`;
      img.loading = "lazy";
      img.addEventListener("error", () => img.replaceWith(el("div", "missing", "image not available")));
      img.src = `api/items/${encodeURIComponent(r.row)}/image`;
      const caption = el("figcaption");
      caption.append(meta, labels);
      card.append(img, caption);
      $("grid").append(card);
    } else {
      const item = el("li", "result");
      item.append(meta, el("span", "caption", r.caption), labels);
      $("captions").append(item);
    }
  }
}

function moreLikeThis(row, target) {
  const link = el("a", "similar", "more like this");
  link.href = `api/items/${encodeURIComponent(row)}/similar?${new URLSearchParams({ target, k: $("k").value })}`;
  link.addEventListener("click", async (event) => {
    event.preventDefault();
    clearError();
    $("query-image").hidden = true;
    busy(true);
    try {
      render(await call(link.href));
    } catch (err) {
      showError(err.message);
    } finally {
      busy(false);
    }
  });
  return link;
}

async function searchText(event) {
  event.preventDefault();
  clearError();
  $("query-image").hidden = true;
  busy(true);
  try {
    render(await call(`api/search?${new URLSearchParams({ text: $("text").value, k: $("k").value })}`));
  } catch (err) {
    showError(err.message);
  } finally {
    busy(false);
  }
}

async function searchImage(file) {
  clearError();
  if (!file) return;
  if (info && file.size > info.limits.max_upload_bytes) {
    showError(`${file.name} is ${file.size.toLocaleString()} bytes; the limit is ${info.limits.max_upload_bytes.toLocaleString()}`);
    return;
  }
  const preview = $("query-image");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("k", $("k").value);
  busy(true);
  try {
    render(await call("api/search", { method: "POST", body: form }));
  } catch (err) {
    showError(err.message);
  } finally {
    busy(false);
  }
}

function wire() {
  const drop = $("drop");
  const file = $("file");
  const usable = () => drop.dataset.disabled !== "true";
  $("text-form").addEventListener("submit", searchText);
  drop.addEventListener("click", () => usable() && file.click());
  drop.addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && usable()) {
      event.preventDefault();
      file.click();
    }
  });
  file.addEventListener("change", () => {
    searchImage(file.files[0]);
    file.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (usable()) drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (usable()) searchImage(event.dataTransfer.files[0]);
  });
  loadInfo();
}

wire();
