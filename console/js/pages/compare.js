// Compare: the same conversation sent to two endpoints side by side, both streaming at once,
// each with its latency (TTFT, total) and token counts.
import { h, field, select, notice, announce } from "../dom.js";
import { describe } from "../api.js";
import { chatBody, runChat } from "../chat.js";
import { settingsForm, fillEndpoints, chatLog } from "./playground.js";

const CHAT = "llm/v1/chat";

function pane(side) {
  const endpoint = select([], { id: `cmp-endpoint-${side}` });
  const log = chatLog(`Answers from endpoint ${side.toUpperCase()}`);
  const error = notice("error");
  const metrics = h("dl", { class: "metrics", id: `cmp-metrics-${side}` });
  const el = h("div", { class: "card pane", id: `cmp-pane-${side}` },
    field(`Endpoint ${side.toUpperCase()}`, endpoint), log.el, error.el, metrics);
  return { side, endpoint, log, error, metrics, el, history: [] };
}

function showMetrics(dl, result) {
  const u = result.usage || {};
  const rows = [
    ["Time to first token", result.ttftMs === null ? "–" : `${Math.round(result.ttftMs)} ms`],
    ["Total latency", `${Math.round(result.totalMs)} ms`],
    ["Prompt tokens", u.prompt_tokens ?? "–"],
    ["Completion tokens", u.completion_tokens ?? "–"],
    ["Finish", result.stopped ? "stopped" : (result.finishReason || "–")],
  ];
  dl.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { "data-metric": k }, String(v))]));
}

function build(section, ctx) {
  const form = settingsForm({ withPath: false, withEndpoint: false, idPrefix: "cmp" });
  const empty = notice("info");
  const panes = [pane("a"), pane("b")];
  const input = h("textarea", { id: "cmp-input", rows: "2", placeholder: "A message for both endpoints (Enter sends)" });
  const send = h("button", { type: "submit", id: "cmp-send" }, "Send to both");
  const stop = h("button", { type: "button", id: "cmp-stop", class: "danger", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "secondary" }, "Clear");
  let controller = null;

  const composer = h("form", { class: "composer", "aria-label": "Message for both endpoints" },
    h("label", { for: input.id, class: "visually-hidden" }, "Message for both endpoints"), input,
    h("div", { class: "row" }, send, stop, h("span", { class: "spacer" }), clear));

  async function one(p, text, s, signal) {
    const msgs = s.system ? [{ role: "system", content: s.system }] : [];
    msgs.push(...p.history, { role: "user", content: text });
    const body = chatBody({ path: "openai", endpoint: p.endpoint.value, messages: msgs, settings: s.settings });
    p.error.clear();
    p.log.add("user", text);
    const answer = p.log.add("assistant");
    answer.li.setAttribute("aria-busy", "true");
    answer.li.dataset.state = "streaming";
    p.metrics.replaceChildren();
    try {
      const result = await runChat({ path: "openai", endpoint: p.endpoint.value, body, signal, onText: (d) => answer.append(d) });
      answer.done(result);
      p.history.push({ role: "user", content: text }, { role: "assistant", content: result.text });
      showMetrics(p.metrics, result);
    } catch (e) {
      answer.remove();
      p.error.show(describe(e));
    }
  }

  composer.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (controller) return;
    const text = input.value.trim();
    if (!text) return;
    let s;
    try {
      s = form.read();
    } catch (e) {
      panes[0].error.show(e.message);
      return;
    }
    if (panes.some((p) => !p.endpoint.value)) {
      panes[0].error.show("Pick two endpoints first.");
      return;
    }
    input.value = "";
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    await Promise.allSettled(panes.map((p) => one(p, text, s, controller.signal)));
    controller = null;
    send.disabled = false;
    stop.disabled = true;
    announce("Both answers complete.");
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      composer.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  clear.addEventListener("click", () => {
    if (controller) controller.abort();
    for (const p of panes) {
      p.history = [];
      p.log.clear();
      p.error.clear();
      p.metrics.replaceChildren();
    }
  });

  const refresh = () => panes.forEach((p, i) => fillEndpoints(p.endpoint, ctx, CHAT, empty, i));
  window.addEventListener("fmapi:models", refresh);
  refresh();

  section.append(
    h("p", { class: "lede" }, "Send the same conversation to two endpoints at once and compare their answers, latency and tokens."),
    empty.el,
    h("details", { class: "card compare-settings" }, h("summary", {}, "Settings for both"), form.el),
    h("div", { class: "compare" }, panes.map((p) => p.el)),
    h("div", { class: "card" }, composer));
}

export default {
  id: "compare",
  title: "Compare",
  create: build,
  shown(ctx) {
    ctx.refreshModels().catch(() => {});
  },
};
