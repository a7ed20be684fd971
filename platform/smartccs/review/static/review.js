// The review workstation's page: worklist, slide viewer with cell gallery, sign-off.
// Every call carries the tab's token (sessionStorage); the server answers only for its center.
"use strict";

const API = "/review/v1";
const COLOURS = ["#e6194b", "#f58231", "#ffe119", "#3cb44b", "#4363d8", "#911eb4"];
const state = { me: null, slides: [], sort: { key: "score", asc: false }, viewer: null, cells: [] };
const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("ccs-token"); }

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  const res = await fetch(API + path, { ...options, headers });
  if (res.status === 401) { signOut("your token was not accepted"); throw new Error("401"); }
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = JSON.stringify((await res.json()).detail); } catch (e) { /* not JSON */ }
    throw new Error(`${res.status}: ${detail}`);
  }
  return res;
}

function show(section) {
  for (const id of ["login", "worklist", "slide"]) $(id).hidden = id !== section;
  $("logout").hidden = section === "login";
}

function signOut(why) {
  sessionStorage.removeItem("ccs-token");
  state.me = null;
  $("login-error").textContent = why || "";
  $("who").textContent = "";
  show("login");
}

async function whoAmI() {
  state.me = await (await api("/me")).json();
  $("who").textContent = `${state.me.center}` + (state.me.reviewer ? ` · ${state.me.reviewer}` : " · read only");
}

// --- worklist ---------------------------------------------------------------------------------

function cmp(a, b, key) {
  const va = a[key], vb = b[key];
  if (va === vb) return 0;
  if (va === null || va === undefined) return 1;
  if (vb === null || vb === undefined) return -1;
  return va < vb ? -1 : 1;
}

function renderWorklist() {
  const { key, asc } = state.sort;
  let rows = state.slides.slice();
  if ($("only-unreviewed").checked) rows = rows.filter((s) => s.review === "unreviewed");
  if ($("only-positive").checked) rows = rows.filter((s) => s.positive);
  rows.sort((a, b) => (asc ? 1 : -1) * cmp(a, b, key));
  for (const th of document.querySelectorAll("#slides th")) {
    th.classList.toggle("sorted", th.dataset.key === key);
    th.classList.toggle("asc", th.dataset.key === key && asc);
  }
  const body = document.querySelector("#slides tbody");
  body.replaceChildren(...rows.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.batch = s.batch; tr.dataset.slide = s.slide_id;
    const review = s.review === "unreviewed" ? "—" : `${s.category} (${s.reviewer})`;
    const cells = [s.batch, s.slide_id, s.status, s.predicted_grade ?? "—",
      s.score === null ? "—" : s.score.toFixed(3),
      s.positive === null ? "—" : (s.positive ? "positive" : "negative"), review];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 2) td.className = `status-${s.status}`;
      if (i === 5 && s.positive) td.className = "pos";
      tr.append(td);
    });
    tr.addEventListener("click", () => { location.hash = `#/slide/${s.batch}/${s.slide_id}`; });
    return tr;
  }));
  $("count").textContent = `${rows.length} of ${state.slides.length} slides`;
}

async function openWorklist() {
  show("worklist");
  state.slides = (await (await api("/worklist")).json()).slides;
  renderWorklist();
}

// --- slide --------------------------------------------------------------------------------------

function classColour(name) { return COLOURS[state.me.cell_classes.indexOf(name)] || "#999"; }

function scaleBar(viewer, mpp) {
  const imageZoom = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
  const umPerScreenPx = mpp / imageZoom;
  const nice = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];
  const um = nice.find((n) => n / umPerScreenPx >= 80) || nice[nice.length - 1];
  $("scalebar").querySelector("div").style.width = `${um / umPerScreenPx}px`;
  $("scalebar").querySelector("span").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}

function imageRect(viewer, view, c) {
  return viewer.viewport.imageToViewportRectangle(
    c.x0 - view.bounds_x, c.y0 - view.bounds_y, c.x1 - c.x0, c.y1 - c.y0);
}

function drawBoxes(viewer, view, cells) {
  viewer.clearOverlays();
  if (!$("show-boxes").checked) return;
  for (const c of cells) {
    const el = document.createElement("div");
    el.className = "box"; el.style.borderColor = classColour(c.cell_class);
    viewer.addOverlay({ element: el, location: imageRect(viewer, view, c) });
  }
}

async function toggleHeatmap(batch, slide, view, heatmap) {
  const on = $("show-heatmap").checked;
  $("heatmap-legend").hidden = !on;
  $("heatmap-scale").textContent = `0 – ${heatmap.vmax.toPrecision(2)} ${heatmap.unit}; ${heatmap.scope}`;
  if (state.heatmap) { state.viewer.world.removeItem(state.heatmap); state.heatmap = null; }
  if (!on) return;
  const blob = await (await api(`/slides/${batch}/${slide}/heatmap.png`)).blob();
  // the layer covers the whole slide from its level-0 origin; the image starts at the bounds
  state.viewer.addTiledImage({
    tileSource: { type: "image", url: URL.createObjectURL(blob) },
    x: -view.bounds_x / view.width, y: -view.bounds_y / view.width,
    width: view.slide_width / view.width,
    success: (e) => { state.heatmap = e.item; },
  });
}

function centreOn(viewer, view, c, item) {
  const r = imageRect(viewer, view, c);
  viewer.viewport.panTo(new OpenSeadragon.Point(r.x + r.width / 2, r.y + r.height / 2));
  viewer.viewport.zoomTo(viewer.viewport.imageToViewportZoom(1.0));  // full resolution
  for (const el of document.querySelectorAll(".cell")) el.classList.remove("active");
  item.classList.add("active");
}

async function cellImage(img, path) {
  const blob = await (await api(path)).blob();
  img.src = URL.createObjectURL(blob);
}

function renderGallery(batch, slide, view, cells) {
  $("legend").replaceChildren(...state.me.cell_classes.map((name) => {
    const s = document.createElement("span");
    s.innerHTML = `<i style="background:${classColour(name)}"></i>${name}`;
    return s;
  }));
  const perClass = 6;
  const shown = state.me.cell_classes.flatMap((name) => cells.filter((c) => c.cell_class === name).slice(0, perClass));
  $("gallery").replaceChildren(...shown.map((c) => {
    const item = document.createElement("div");
    item.className = "cell"; item.style.borderColor = classColour(c.cell_class);
    item.dataset.cls = c.cell_class; item.dataset.rank = c.rank;
    const img = document.createElement("img");
    img.alt = `${c.cell_class} #${c.rank + 1}`;
    cellImage(img, `/slides/${batch}/${slide}/cells/${encodeURIComponent(c.cell_class)}/${c.rank}.jpeg`);
    const label = document.createElement("div");
    label.textContent = `${c.cell_class} ${c.score.toFixed(2)}`;
    const fix = document.createElement("select");
    fix.className = "correction";
    fix.innerHTML = `<option value="">as detected</option>` +
      state.me.cell_classes.filter((n) => n !== c.cell_class).map((n) => `<option>${n}</option>`).join("") +
      `<option value="${state.me.not_a_cell}">not a cell</option>`;
    fix.addEventListener("click", (e) => e.stopPropagation());
    item.append(img, label, fix);
    item.addEventListener("click", () => centreOn(state.viewer, view, c, item));
    item.cell = c;
    return item;
  }));
}

function renderHistory(reviews) {
  $("history").replaceChildren(...reviews.map((r) => {
    const li = document.createElement("li");
    const fixes = r.corrections.length ? `, ${r.corrections.length} cell corrections` : "";
    li.textContent = `${r.reviewed_at.slice(0, 16).replace("T", " ")} ${r.reviewer}: ${r.category}${fixes}` +
      (r.comment ? ` — ${r.comment}` : "");
    return li;
  }));
}

async function openSlide(batch, slide) {
  show("slide");
  const data = await (await api(`/slides/${batch}/${slide}`)).json();
  const { view, cells } = data;
  state.cells = cells;
  const s = data.slide;
  $("slide-title").textContent = `${batch} / ${slide}`;
  $("slide-call").textContent = `${s.status} · ${s.predicted_grade ?? "—"} · score ${s.score === null ? "—" : s.score.toFixed(3)}` +
    (s.positive ? " · positive" : "");
  $("category").innerHTML = state.me.categories.map((c) => `<option>${c}</option>`).join("");
  if (state.viewer) state.viewer.destroy();
  state.heatmap = null;
  const base = `${API}/slides/${batch}/${slide}/tiles`;
  state.viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "/review/viewer/images/",
    showNavigator: true,
    loadTilesWithAjax: true,
    ajaxHeaders: { Authorization: `Bearer ${token()}` },
    maxZoomPixelRatio: 2,
    tileSources: {
      width: view.width, height: view.height, tileSize: view.tile_size, tileOverlap: view.overlap,
      minLevel: view.min_level, maxLevel: view.levels - 1,
      getTileUrl: (level, x, y) => `${base}/${level}/${x}_${y}.jpeg`,
    },
  });
  state.viewer.addHandler("open", () => drawBoxes(state.viewer, view, cells));
  state.viewer.addHandler("animation", () => scaleBar(state.viewer, view.mpp));
  state.viewer.addHandler("open", () => scaleBar(state.viewer, view.mpp));
  $("show-boxes").onchange = () => drawBoxes(state.viewer, view, cells);
  $("show-heatmap").checked = false;
  $("heatmap-legend").hidden = true;
  $("show-heatmap").onchange = () => toggleHeatmap(batch, slide, view, data.heatmap);
  renderGallery(batch, slide, view, cells);
  renderHistory(data.reviews);
  state.signoffKey = newKey();
  $("signoff-status").textContent = state.me.reviewer ? "" : "This token can read, not sign off.";
  $("signoff").onsubmit = async (e) => {
    e.preventDefault();
    const corrections = [...document.querySelectorAll(".cell")]
      .filter((el) => el.querySelector(".correction").value)
      .map((el) => ({ ...pick(el.cell), verdict: el.querySelector(".correction").value }));
    const body = { slide_id: slide, category: $("category").value, comment: $("comment").value || null, corrections };
    try {
      await api(`/batches/${batch}/reviews`, {
        method: "POST", body: JSON.stringify(body),
        headers: { "Content-Type": "application/json", "Idempotency-Key": state.signoffKey },
      });
      state.signoffKey = newKey();  // a retry of the same click is the same review, a new one is not
      $("signoff-status").textContent = "Signed out.";
      const again = await (await api(`/slides/${batch}/${slide}`)).json();
      renderHistory(again.reviews);
    } catch (err) {
      $("signoff-status").textContent = `Not saved: ${err.message}`;
    }
  };
}

function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function pick(c) {
  return { cell_class: c.cell_class, rank: c.rank, x0: c.x0, y0: c.y0, x1: c.x1, y1: c.y1 };
}

// --- routing ------------------------------------------------------------------------------------

async function route() {
  if (!token()) { show("login"); return; }
  try {
    if (!state.me) await whoAmI();
    const m = location.hash.match(/^#\/slide\/([^/]+)\/([^/]+)$/);
    if (m) await openSlide(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
    else await openWorklist();
  } catch (err) {
    if (err.message !== "401") document.title = `error: ${err.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("ccs-token", $("token").value.trim());
    route();
  });
  $("logout").addEventListener("click", () => signOut());
  for (const th of document.querySelectorAll("#slides th")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      state.sort = { key, asc: state.sort.key === key ? !state.sort.asc : key !== "score" };
      renderWorklist();
    });
  }
  $("only-unreviewed").addEventListener("change", renderWorklist);
  $("only-positive").addEventListener("change", renderWorklist);
  window.addEventListener("hashchange", route);
  route();
});
