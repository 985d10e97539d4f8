// The two pictures the console draws, with no library: a similarity heat map (an HTML table,
// colour by CSS class, so screen readers read it as a table) and a stacked bar chart (SVG, with
// its numbers also in a table). Colours are classes in console.css: the CSP allows no inline style.
import { h, s, fmt } from "./dom.js";

export function cosineMatrix(vectors) {
  const norms = vectors.map((v) => Math.sqrt(v.reduce((a, x) => a + x * x, 0)) || 1);
  return vectors.map((a, i) =>
    vectors.map((b, j) => {
      let dot = 0;
      for (let k = 0; k < a.length; k += 1) dot += a[k] * b[k];
      return dot / (norms[i] * norms[j]);
    }));
}

const BUCKETS = 10;

/** Class for a similarity: heat-0 (0 or below) .. heat-10 (1). */
function heatClass(v) {
  const k = Math.max(0, Math.min(BUCKETS, Math.round(v * BUCKETS)));
  return `heat-${k}`;
}

function short(text, n = 40) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

export function heatMap(sentences, matrix) {
  const head = h("tr", {}, h("td", { class: "corner" }),
    sentences.map((t, j) => h("th", { scope: "col", title: t, class: "col-head" }, `#${j + 1}`)));
  const rows = matrix.map((row, i) =>
    h("tr", {},
      h("th", { scope: "row", title: sentences[i], class: "row-head" },
        h("span", { class: "idx" }, `#${i + 1} `), short(sentences[i])),
      row.map((v, j) => h("td", {
        class: `cell ${heatClass(v)}`,
        title: `#${i + 1} vs #${j + 1}: ${v.toFixed(3)}`,
        "data-row": i, "data-col": j, "data-value": v.toFixed(6),
      }, v.toFixed(2)))));
  const table = h("table", { class: "heatmap" },
    h("caption", {}, "Cosine similarity between the sentences (1 = same direction)"),
    h("thead", {}, head), h("tbody", {}, rows));
  const legend = h("div", { class: "legend", "aria-hidden": "true" },
    h("span", {}, "0"),
    Array.from({ length: BUCKETS + 1 }, (_, k) => h("span", { class: `swatch heat-${k}` })),
    h("span", {}, "1"));
  return h("div", { class: "heatmap-wrap" }, h("div", { class: "scroll-x" }, table), legend);
}

const SERIES = 8; // series-0 .. series-7 in console.css

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/**
 * A stacked bar chart: `days` (x labels, oldest first), `series` ([{name, values[]}], one
 * value per day). Returns {el} with the SVG, its legend, and a data table.
 */
export function stackedBars({ days, series, label, unit = "tokens", width = 720 }) {
  // Drawn at the width it is shown at, so its 12px labels stay 12px on a phone.
  const W = Math.max(300, Math.min(1200, Math.round(width)));
  const H = W < 500 ? 240 : 300;
  const M = { top: 12, right: 12, bottom: 44, left: W < 500 ? 52 : 64 };
  const totals = days.map((_, i) => series.reduce((a, se) => a + (se.values[i] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  const iw = W - M.left - M.right;
  const ih = H - M.top - M.bottom;
  const band = iw / Math.max(1, days.length);
  const bw = Math.max(2, Math.min(48, band * 0.7));
  const y = (v) => M.top + ih - (v / max) * ih;

  const grid = [];
  for (let t = 0; t <= 4; t += 1) {
    const v = (max * t) / 4;
    grid.push(s("line", { x1: M.left, x2: W - M.right, y1: y(v), y2: y(v), class: "grid" }));
    grid.push(s("text", { x: M.left - 8, y: y(v) + 4, class: "tick", "text-anchor": "end", text: fmt.int(v) }));
  }
  const every = Math.ceil(days.length / Math.max(3, Math.floor(W / 70)));
  const xlabels = days.map((d, i) => (i % every === 0 || i === days.length - 1
    ? s("text", { x: M.left + band * (i + 0.5), y: H - M.bottom + 18, class: "tick", "text-anchor": "middle", text: d.slice(5) })
    : null));
  const bars = [];
  days.forEach((d, i) => {
    let acc = 0;
    series.forEach((se, k) => {
      const v = se.values[i] || 0;
      if (!v) return;
      const y0 = y(acc);
      acc += v;
      const y1 = y(acc);
      bars.push(s("rect", {
        x: M.left + band * (i + 0.5) - bw / 2, y: y1, width: bw, height: Math.max(0.5, y0 - y1),
        class: `bar series-${k % SERIES}`,
      }, s("title", { text: `${d} · ${se.name}: ${fmt.int(v)} ${unit}` })));
    });
  });
  const total = totals.reduce((a, b) => a + b, 0);
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": `${label}: ${fmt.int(total)} ${unit} over ${days.length} days, by endpoint (numbers in the table below)`,
  }, grid, s("line", { x1: M.left, x2: W - M.right, y1: y(0), y2: y(0), class: "axis" }), xlabels, bars);

  const legend = h("ul", { class: "chart-legend" },
    series.map((se, k) => h("li", {},
      h("span", { class: `swatch series-${k % SERIES}`, "aria-hidden": "true" }),
      `${se.name} (${fmt.int(se.values.reduce((a, b) => a + b, 0))})`)));

  const table = h("table", { class: "data usage-table" },
    h("caption", {}, `${label}, per day and endpoint`),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Day"),
      series.map((se) => h("th", { scope: "col" }, se.name)), h("th", { scope: "col" }, "Total"))),
    h("tbody", {}, days.map((d, i) => (totals[i] ? h("tr", {},
      h("th", { scope: "row" }, d),
      series.map((se) => h("td", { class: "num" }, fmt.int(se.values[i] || 0))),
      h("td", { class: "num" }, fmt.int(totals[i]))) : null))));
  return { el: h("div", { class: "chart-wrap" }, svg, legend), table };
}
