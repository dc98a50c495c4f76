// The run gallery: rows arrive as data scripts (gallery/data/*.js, one per results index file), listed by
// gallery/files.js. Script tags, not fetch(): pages opened from local disk may not fetch files. Rows are filtered in
// memory and drawn a page at a time, so 100,000 rows cost a few MB of data and PAGE_SIZE cards.
"use strict";

const PAGE_SIZE = 48;
const state = { info: null, columns: [], rows: [], expected: 0, arrived: 0, shown: [], page: 0 };

window.skyreelsGallery = {
  files(info) {
    state.info = info;
    state.expected = info.files.length;
    if (!state.expected) ready();
    for (const [name, version] of info.files) addScript(`gallery/data/${name}.js?v=${version}`);
  },
  add(columns, rows, qualityColumns) {
    state.columns = columns;
    for (const values of rows) {
      const row = {};
      columns.forEach((column, i) => { row[column] = values[i]; });
      // The quality columns arrive as one array (null without signals): spread them onto the row.
      if (row.quality) qualityColumns.forEach((column, i) => { row[column] = row.quality[i]; });
      row.search = `${row.id}\n${row.prompt || ""}`.toLowerCase();
      state.rows.push(row);
    }
    arrived();
  },
};

function addScript(src) {
  const script = document.createElement("script");
  script.src = src;
  script.onerror = arrived; // a file the run replaced since files.js was read: the rest still shows
  document.body.appendChild(script);
}

function arrived() {
  state.arrived += 1;
  if (state.arrived === state.expected) ready();
}

function ready() {
  const done = state.rows.filter((row) => row.status === "done").length;
  const when = state.info ? ` · index updated ${state.info.updated}` : "";
  const running = state.info && state.info.running ? " · the run is still going: reload for more" : "";
  document.getElementById("summary").textContent =
    `${state.rows.length.toLocaleString()} rows: ${done.toLocaleString()} done, ` +
    `${(state.rows.length - done).toLocaleString()} failed${when}${running}`;
  applyFilters();
}

// A signal's value for filters and sorting: `cuts` by how many.
function signal(row, name) {
  const value = row[name];
  return Array.isArray(value) ? value.length : value;
}

function passesQuality(row, name, side, threshold) {
  if (!name) return true;
  if (name === "flagged") return Array.isArray(row.quality_flags) && row.quality_flags.length > 0;
  const value = signal(row, name);
  if (value == null) return false;
  if (Number.isNaN(threshold)) return true;
  return side === "above" ? value > threshold : value < threshold;
}

// Rows without the value (failed rows, rows of older runs) go last, whichever the direction.
function compareBy(key) {
  const descending = key.startsWith("-");
  const name = descending ? key.slice(1) : key;
  return (a, b) => {
    const x = signal(a, name);
    const y = signal(b, name);
    if (x == null || y == null) return (x == null) - (y == null) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
    if (x !== y) return (x < y ? -1 : 1) * (descending ? -1 : 1);
    return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  };
}

function applyFilters() {
  const query = document.getElementById("search").value.trim().toLowerCase();
  const status = document.getElementById("status").value;
  const mode = document.getElementById("mode").value;
  const name = document.getElementById("signal").value;
  const side = document.getElementById("side").value;
  const threshold = parseFloat(document.getElementById("threshold").value);
  state.shown = state.rows.filter(
    (row) =>
      (!status || row.status === status) &&
      (!mode || row.mode === mode) &&
      (!query || row.search.includes(query)) &&
      passesQuality(row, name, side, threshold),
  );
  state.shown.sort(compareBy(document.getElementById("sort").value));
  state.page = 0;
  drawPage();
}

function qualityFacts(row) {
  if (row.quality_motion == null) return null;
  const fixed = (value, digits) => (value == null ? "–" : value.toFixed(digits));
  const cuts = row.quality_cuts && row.quality_cuts.length ? `cuts at ${row.quality_cuts.join(", ")}` : "no cuts";
  const facts = [`black ${fixed(row.quality_black_fraction, 2)}`, `frozen ${fixed(row.quality_frozen_fraction, 2)}`,
    `motion ${fixed(row.quality_motion, 4)}`, `sharpness ${fixed(row.quality_sharpness, 1)}`, cuts];
  if (row.quality_seam_jump != null) facts.push(`seam jump ${fixed(row.quality_seam_jump, 2)}`);
  if (row.quality_drift != null) facts.push(`drift ${fixed(row.quality_drift, 3)}`);
  return facts.join(" · ");
}

function drawPage() {
  const pages = Math.max(1, Math.ceil(state.shown.length / PAGE_SIZE));
  state.page = Math.min(Math.max(state.page, 0), pages - 1);
  const first = state.page * PAGE_SIZE;
  const cards = document.getElementById("cards");
  cards.replaceChildren(...state.shown.slice(first, first + PAGE_SIZE).map(card));
  document.getElementById("page").textContent =
    `page ${state.page + 1} of ${pages} (${state.shown.length.toLocaleString()} rows)`;
  document.getElementById("previous").disabled = state.page === 0;
  document.getElementById("next").disabled = state.page >= pages - 1;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never innerHTML: prompts and errors are user data
  return node;
}

function card(row) {
  const article = element("article", `card ${row.status}`);
  article.dataset.id = row.id;
  const media = element("div", "media");
  if (row.poster) {
    const img = element("img");
    img.src = row.poster;
    img.alt = `poster of ${row.id}`;
    media.appendChild(img);
  } else {
    media.appendChild(element("span", "none", row.status === "failed" ? "no video: the row failed" : "no poster"));
  }
  if (row.video) {
    media.title = "play";
    media.addEventListener("click", () => {
      if (media.querySelector("video")) return;
      const video = element("video");
      Object.assign(video, { src: row.video, controls: true, autoplay: true, muted: true, loop: true, playsInline: true });
      media.replaceChildren(video);
    });
  }
  const body = element("div", "body");
  body.appendChild(element("h2", "", row.id));
  body.appendChild(element("p", "prompt", row.prompt || "(no prompt: the row failed validation)"));
  const size = row.width && row.height ? `${row.width}x${row.height}` : "size ?";
  const segments = row.num_segments === 1 ? "1 segment" : `${row.num_segments ?? "?"} segments`;
  const facts = [row.mode || "mode ?", `seed ${row.seed ?? "?"}`, size, `${row.num_frames ?? "?"} frames`, segments,
    row.status];
  if (row.render_s != null) facts.push(`render ${row.render_s.toFixed(1)} s`);
  body.appendChild(element("p", "facts", facts.join(" · ")));
  const quality = qualityFacts(row);
  if (quality) body.appendChild(element("p", "quality", quality));
  if (row.quality_flags && row.quality_flags.length) {
    body.appendChild(element("p", "flags", `flagged: ${row.quality_flags.join(", ")}`));
  }
  if (row.error) body.appendChild(element("p", "error", row.error));
  const links = element("div", "links");
  for (const [label, href] of [["MP4", row.video], ["contact sheet", row.sheet]]) {
    if (!href) continue;
    const link = element("a", "", label);
    link.href = href;
    links.appendChild(link);
  }
  body.appendChild(links);
  article.appendChild(media);
  article.appendChild(body);
  return article;
}

document.getElementById("search").addEventListener("input", applyFilters);
for (const id of ["status", "mode", "signal", "side", "sort"]) {
  document.getElementById(id).addEventListener("change", applyFilters);
}
document.getElementById("threshold").addEventListener("input", applyFilters);
document.getElementById("previous").addEventListener("click", () => { state.page -= 1; drawPage(); });
document.getElementById("next").addEventListener("click", () => { state.page += 1; drawPage(); });
addScript(`gallery/files.js?v=${Date.now()}`);
