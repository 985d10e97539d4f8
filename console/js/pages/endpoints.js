// Endpoints: what this token can see (admins: every endpoint), with state, task, capacity
// mode, limits and live replicas (GET /api/2.0/serving-endpoints).
import { h, notice, fmt } from "../dom.js";
import * as api from "../api.js";

const LIMIT_NAMES = [
  ["requests_per_minute", "requests/min"],
  ["tokens_per_minute", "tokens/min"],
  ["input_tokens_per_minute", "input tokens/min"],
  ["output_tokens_per_minute", "output tokens/min"],
];

function rates(obj) {
  return LIMIT_NAMES.filter(([k]) => Number(obj?.[k])).map(([k, label]) => `${fmt.int(obj[k])} ${label}`);
}

/** The endpoint's limits as short lines: per principal, the endpoint ceiling, overrides, caps. */
export function limitLines(limits = {}) {
  const lines = [];
  const each = rates(limits);
  if (each.length) lines.push(`each caller: ${each.join(", ")}`);
  const ceiling = rates(limits.endpoint);
  if (ceiling.length) lines.push(`endpoint: ${ceiling.join(", ")}`);
  for (const p of limits.principals || []) {
    const r = rates(p.limits);
    if (r.length) lines.push(`${p.principal}: ${r.join(", ")}`);
  }
  if (Number(limits.default_max_tokens)) lines.push(`default max_tokens ${limits.default_max_tokens}`);
  if (Number(limits.max_prompt_tokens)) lines.push(`prompt ≤ ${fmt.int(limits.max_prompt_tokens)} tokens`);
  if (Number(limits.request_timeout_seconds)) lines.push(`timeout ${limits.request_timeout_seconds} s`);
  return lines.length ? lines : ["none"];
}

function capacity(ep) {
  if (ep.capacity_mode !== "provisioned_throughput") return "pay-per-token";
  const se = (ep.config?.served_entities || [])[0] || {};
  return `provisioned throughput (${fmt.int(se.min_provisioned_throughput)}–${fmt.int(se.max_provisioned_throughput)} tokens/s)`;
}

function row(ep) {
  const entities = ep.config?.served_entities || [];
  const routes = Object.fromEntries((ep.config?.traffic_config?.routes || []).map((r) => [r.served_entity_name, r.traffic_percentage]));
  const replicas = entities.reduce((a, se) => a + (se.live_replicas || 0), 0);
  const ready = ep.state?.ready === "READY";
  let state = ready ? "Ready" : "Not ready";
  if (ep.retired) state = `Retired → ${ep.replacement}`;
  else if (ep.state?.config_update === "IN_PROGRESS") state += " (updating)";
  return h("tr", { "data-endpoint": ep.name },
    h("th", { scope: "row" }, ep.name, ep.description ? h("div", { class: "muted small" }, ep.description) : null),
    h("td", { "data-col": "task", "data-label": "Task" }, ep.task),
    h("td", { "data-col": "state", "data-label": "State" }, h("span", { class: `badge ${ep.retired ? "retired" : ready ? "ok" : "warn"}` }, state)),
    h("td", { "data-col": "capacity", "data-label": "Capacity mode" }, capacity(ep)),
    h("td", { "data-col": "models", "data-label": "Served models" }, h("ul", { class: "plain" }, entities.map((se) =>
      h("li", {}, se.entity_name, entities.length > 1 ? ` (${routes[se.name] ?? 0}%)` : "")))),
    h("td", { "data-col": "replicas", "data-label": "Live replicas", class: "num" }, String(replicas)),
    h("td", { "data-col": "limits", "data-label": "Limits" }, h("ul", { class: "plain" }, limitLines(ep.limits).map((l) => h("li", {}, l)))));
}

function build(section) {
  const error = notice("error");
  const status = h("p", { class: "muted", role: "status" });
  const refresh = h("button", { type: "button", class: "secondary", id: "ep-refresh" }, "Refresh");
  const tbody = h("tbody");
  const table = h("table", { class: "data endpoints stack" },
    h("caption", { class: "visually-hidden" }, "Serving endpoints"),
    h("thead", {}, h("tr", {}, ["Name", "Task", "State", "Capacity mode", "Served models", "Live replicas", "Limits"]
      .map((c) => h("th", { scope: "col" }, c)))),
    tbody);

  async function load() {
    refresh.disabled = true;
    status.textContent = "Loading…";
    try {
      const r = await api.get("/api/2.0/serving-endpoints");
      const eps = (r.endpoints || []).sort((a, b) => a.name.localeCompare(b.name));
      tbody.replaceChildren(...eps.map(row));
      status.textContent = `${eps.length} endpoint${eps.length === 1 ? "" : "s"}, as of ${new Date().toLocaleTimeString()}.`;
      error.clear();
    } catch (e) {
      status.textContent = "";
      error.show(api.describe(e));
    } finally {
      refresh.disabled = false;
    }
  }
  refresh.addEventListener("click", load);
  section.append(
    h("div", { class: "row" }, h("p", { class: "lede" }, "The endpoints this token can see."), h("span", { class: "spacer" }), refresh),
    error.el, status, h("div", { class: "card scroll-x" }, table));
  return load;
}

let loader = null;

export default {
  id: "endpoints",
  title: "Endpoints",
  create(section) {
    loader = build(section);
  },
  shown() {
    if (loader) loader();
  },
};
