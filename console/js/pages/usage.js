// Usage: tokens per day per endpoint (GET /api/2.0/usage). A token sees its own principal's
// records; an admin token sees everyone's, and can narrow them to one principal.
import { h, field, select, setOptions, notice, fmt } from "../dom.js";
import * as api from "../api.js";
import { stackedBars } from "../charts.js";

const WINDOWS = [
  { value: "1d", label: "Last 24 hours" },
  { value: "7d", label: "Last 7 days" },
  { value: "30d", label: "Last 30 days" },
  { value: "90d", label: "Last 90 days" },
];
const METRICS = [
  { value: "tokens", label: "Tokens (input + output)" },
  { value: "input_tokens", label: "Input tokens" },
  { value: "output_tokens", label: "Output tokens" },
  { value: "requests", label: "Requests" },
];
const ALL = "*";

/** Every UTC day from `since` to `until` (ISO times), as YYYY-MM-DD. */
export function daysBetween(since, until) {
  const out = [];
  const d = new Date(`${since.slice(0, 10)}T00:00:00Z`);
  const end = until.slice(0, 10);
  for (let i = 0; i < 400; i += 1) {
    const day = d.toISOString().slice(0, 10);
    out.push(day);
    if (day >= end) break;
    d.setUTCDate(d.getUTCDate() + 1);
  }
  return out;
}

function value(g, metric) {
  return metric === "tokens" ? (g.input_tokens || 0) + (g.output_tokens || 0) : (g[metric] || 0);
}

function build(section, ctx) {
  const admin = ctx.session.admin;
  const win = select(WINDOWS, { id: "usage-window" });
  win.value = "7d";
  const metric = select(METRICS, { id: "usage-metric" });
  const who = select([{ value: ALL, label: "Everyone" }], { id: "usage-principal" });
  const error = notice("error");
  const summary = h("p", { class: "muted", id: "usage-summary", role: "status" });
  const chart = h("div", { id: "usage-chart" });
  const tableBox = h("div", { class: "scroll-x" });
  let groups = [];
  let range = null;
  let drawnWidth = 0;

  function draw() {
    const m = metric.value;
    const label = METRICS.find((x) => x.value === m).label;
    const mine = groups.filter((g) => !admin || who.value === ALL || g.principal === who.value);
    const days = daysBetween(range.since, range.until);
    const names = [...new Set(mine.map((g) => g.endpoint))].sort();
    const series = names.map((name) => ({
      name,
      values: days.map((d) => mine.filter((g) => g.endpoint === name && g.day === d).reduce((a, g) => a + value(g, m), 0)),
    }));
    const total = series.reduce((a, se) => a + se.values.reduce((x, y) => x + y, 0), 0);
    const whose = admin ? (who.value === ALL ? "everyone" : who.value) : (ctx.session.principal || "this token's principal");
    summary.textContent = `${fmt.int(total)} ${label.toLowerCase()} for ${whose} on ${names.length} endpoint${names.length === 1 ? "" : "s"}.`;
    if (!names.length) {
      chart.replaceChildren(h("p", { class: "muted" }, "No usage in this window."));
      tableBox.replaceChildren();
      return;
    }
    drawnWidth = chart.clientWidth;
    const c = stackedBars({ days, series, label, unit: m === "requests" ? "requests" : "tokens",
      width: drawnWidth || 720 });
    chart.replaceChildren(c.el);
    tableBox.replaceChildren(c.table);
  }

  async function load() {
    const by = admin ? "day,endpoint,principal" : "day,endpoint";
    try {
      const r = await api.get(`/api/2.0/usage?since=${encodeURIComponent(win.value)}&by=${by}`);
      groups = r.groups || [];
      range = { since: r.since, until: r.until };
      if (admin) {
        const principals = [...new Set(groups.map((g) => g.principal))].sort();
        setOptions(who, [{ value: ALL, label: "Everyone" }, ...principals]);
      }
      error.clear();
      draw();
    } catch (e) {
      summary.textContent = "";
      chart.replaceChildren();
      tableBox.replaceChildren();
      error.show(api.describe(e));
    }
  }

  win.addEventListener("change", load);
  new ResizeObserver(() => {
    const w = chart.clientWidth;
    if (range && w && Math.abs(w - drawnWidth) > 40) {
      drawnWidth = w;
      draw();
    }
  }).observe(chart);
  metric.addEventListener("change", () => range && draw());
  who.addEventListener("change", () => range && draw());

  section.append(
    h("p", { class: "lede" }, admin
      ? "Usage of every principal (this is an admin token)."
      : "Your usage: the requests made with tokens of your principal."),
    h("div", { class: "card controls" },
      field("Window", win), field("Measure", metric), admin ? field("Principal", who) : null),
    error.el,
    h("div", { class: "card" }, summary, chart),
    h("details", { class: "card", open: true }, h("summary", {}, "The numbers"), tableBox));
  return load;
}

let loader = null;

export default {
  id: "usage",
  title: "Usage",
  create(section, ctx) {
    loader = build(section, ctx);
  },
  shown() {
    if (loader) loader();
  },
};
