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
  add(columns, rows) {
    state.columns = columns;
    for (const values of rows) {
      const row = {};
      columns.forEach((column, i) => { row[column] = values[i]; });
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
  state.rows.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const done = state.rows.filter((row) => row.status === "done").length;
  const when = state.info ? ` · index updated ${state.info.updated}` : "";
  const running = state.info && state.info.running ? " · the run is still going: reload for more" : "";
  document.getElementById("summary").textContent =
    `${state.rows.length.toLocaleString()} rows: ${done.toLocaleString()} done, ` +
    `${(state.rows.length - done).toLocaleString()} failed${when}${running}`;
  applyFilters();
}

function applyFilters() {
  const query = document.getElementById("search").value.trim().toLowerCase();
  const status = document.getElementById("status").value;
  const mode = document.getElementById("mode").value;
  state.shown = state.rows.filter(
    (row) => (!status || row.status === status) && (!mode || row.mode === mode) && (!query || row.search.includes(query)),
  );
  state.page = 0;
  drawPage();
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
for (const id of ["status", "mode"]) document.getElementById(id).addEventListener("change", applyFilters);
document.getElementById("previous").addEventListener("click", () => { state.page -= 1; drawPage(); });
document.getElementById("next").addEventListener("click", () => { state.page += 1; drawPage(); });
addScript(`gallery/files.js?v=${Date.now()}`);
