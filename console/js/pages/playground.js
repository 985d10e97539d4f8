// Playground: chat with one endpoint, streamed token by token, with the sampling settings,
// a Stop button (aborts the request: the engine stops), usage and TTFT after each answer, and
// the same call as code.
import { h, field, checkbox, select, setOptions, notice, announce } from "../dom.js";
import { describe } from "../api.js";
import { PATHS, chatBody, parseExtra, runChat, summary } from "../chat.js";
import { codeDialog } from "../code.js";

const CHAT = "llm/v1/chat";

/** The sampling settings form, shared with Compare: returns {el, read()} */
export function settingsForm({ withPath = true, withEndpoint = true, idPrefix }) {
  const endpoint = select([], { id: `${idPrefix}-endpoint` });
  const path = select(PATHS, { id: `${idPrefix}-path` });
  const system = h("textarea", { id: `${idPrefix}-system`, rows: "3", placeholder: "You are a helpful assistant." });
  const num = (id, attrs) => h("input", { type: "number", id: `${idPrefix}-${id}`, inputmode: "decimal", ...attrs });
  const temperature = num("temperature", { min: "0", max: "2", step: "0.1", placeholder: "default" });
  const maxTokens = num("max-tokens", { min: "1", step: "1", inputmode: "numeric", placeholder: "default" });
  const topP = num("top-p", { min: "0", max: "1", step: "0.05", placeholder: "1" });
  const seed = num("seed", { step: "1", inputmode: "numeric", placeholder: "random" });
  const stop = h("textarea", { id: `${idPrefix}-stop-sequences`, rows: "2", placeholder: "one per line" });
  const json = checkbox("JSON mode (response_format: json_object)", { id: `${idPrefix}-json` });
  const extra = h("textarea", { id: `${idPrefix}-extra`, rows: "3", placeholder: "{\"top_k\": 40}", spellcheck: "false" });
  const el = h("div", { class: "settings" },
    withEndpoint ? field("Endpoint", endpoint) : null,
    withPath ? field("API path", path) : null,
    field("System prompt", system),
    h("div", { class: "grid-2" },
      field("Temperature", temperature, "0 to 2"),
      field("Max tokens", maxTokens),
      field("Top p", topP, "0 to 1"),
      field("Seed", seed)),
    field("Stop sequences", stop, "One per line"),
    json.el,
    h("details", { class: "advanced" }, h("summary", {}, "Extra parameters"),
      field("Extra parameters (JSON object)", extra, "Merged into the request body, e.g. top_k, presence_penalty, ignore_eos")));
  return {
    el,
    endpoint,
    read() {
      return {
        endpoint: endpoint.value,
        path: withPath ? path.value : "openai",
        system: system.value.trim(),
        settings: {
          temperature: temperature.value,
          maxTokens: maxTokens.value,
          topP: topP.value,
          seed: seed.value,
          stop: stop.value.split("\n").filter((x) => x.length),
          json: json.input.checked,
          extra: parseExtra(extra.value),
        },
      };
    },
  };
}

/** Fill an endpoint <select> with the token's chat endpoints; a notice when there is none. */
export function fillEndpoints(sel, ctx, task, empty, preferIndex = 0) {
  const names = ctx.endpointsFor(task);
  const keep = sel.value || names[Math.min(preferIndex, names.length - 1)];
  setOptions(sel, names, keep);
  if (names.length) empty.clear();
  else empty.show("This token may query no endpoint of this kind. Ask an admin for a token with access to one.", "info");
  return names;
}

/** A chat log: user and assistant messages; the assistant's text grows as it streams. */
export function chatLog(label) {
  const list = h("ol", { class: "log", "aria-label": label });
  return {
    el: list,
    add(role, text = "") {
      // One text node that grows; pieces that arrive within a frame are drawn together (a
      // layout per token would starve the page on a fast stream).
      const node = document.createTextNode(text);
      const body = h("div", { class: "text" }, node);
      const stats = h("div", { class: "stats" });
      const li = h("li", { class: `msg ${role}` },
        h("div", { class: "role" }, role === "user" ? "You" : "Assistant"), body, stats);
      list.append(li);
      list.scrollTop = list.scrollHeight;
      let pending = "";
      let frame = 0;
      const flush = () => {
        frame = 0;
        if (!pending) return;
        const follow = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
        node.appendData(pending);
        pending = "";
        if (follow) list.scrollTop = list.scrollHeight;
      };
      return {
        li,
        append(delta) {
          pending += delta;
          if (!frame) frame = window.requestAnimationFrame(flush);
        },
        done(result) {
          if (frame) window.cancelAnimationFrame(frame);
          flush();
          li.removeAttribute("aria-busy");
          li.dataset.state = result.stopped ? "stopped" : "done";
          stats.textContent = summary(result);
        },
        remove() {
          li.remove();
        },
      };
    },
    clear() {
      list.replaceChildren();
    },
  };
}

function build(section, ctx) {
  const form = settingsForm({ idPrefix: "pg" });
  const empty = notice("info");
  const error = notice("error");
  const log = chatLog("Conversation");
  const input = h("textarea", { id: "pg-input", rows: "3", placeholder: "Ask something… (Enter sends, Shift+Enter: new line)" });
  const send = h("button", { type: "submit", id: "pg-send" }, "Send");
  const stop = h("button", { type: "button", id: "pg-stop", class: "danger", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "secondary" }, "Clear");
  const code = h("button", { type: "button", class: "secondary", id: "pg-code" }, "View code");
  const dialog = codeDialog();
  let history = [];
  let controller = null;

  const composer = h("form", { class: "composer", "aria-label": "Message" },
    h("label", { for: input.id, class: "visually-hidden" }, "Message"), input,
    h("div", { class: "row" }, send, stop, h("span", { class: "spacer" }), code, clear));

  function messages(extraUser) {
    const { system } = form.read();
    const msgs = system ? [{ role: "system", content: system }] : [];
    msgs.push(...history);
    if (extraUser) msgs.push({ role: "user", content: extraUser });
    return msgs;
  }

  async function submit(ev) {
    ev.preventDefault();
    if (controller) return;
    const text = input.value.trim();
    if (!text) {
      input.focus();
      return;
    }
    let call;
    try {
      const s = form.read();
      if (!s.endpoint) throw new Error("Pick an endpoint first.");
      call = { path: s.path, endpoint: s.endpoint, body: chatBody({ ...s, messages: messages(text) }) };
    } catch (e) {
      error.show(e.message);
      return;
    }
    error.clear();
    input.value = "";
    history.push({ role: "user", content: text });
    const userMsg = log.add("user", text);
    const answer = log.add("assistant");
    answer.li.setAttribute("aria-busy", "true");
    answer.li.dataset.state = "streaming";
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    try {
      const result = await runChat({ ...call, signal: controller.signal, onText: (d) => answer.append(d) });
      answer.done(result);
      history.push({ role: "assistant", content: result.text });
      announce(result.stopped ? "Answer stopped." : "Answer complete.");
    } catch (e) {
      answer.remove();
      userMsg.remove();
      history.pop();
      input.value = text;
      error.show(describe(e));
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
  }

  composer.addEventListener("submit", submit);
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      composer.requestSubmit();
    }
  });
  stop.addEventListener("click", () => {
    if (controller) controller.abort();
    input.focus();
  });
  clear.addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    log.clear();
    error.clear();
    input.focus();
  });
  code.addEventListener("click", () => {
    try {
      const s = form.read();
      const draft = input.value.trim() || (history.length ? "" : "Hello!");
      dialog.open({ path: s.path, endpoint: s.endpoint || "<endpoint>", body: chatBody({ ...s, messages: messages(draft) }) });
    } catch (e) {
      error.show(e.message);
    }
  });

  // Open beside the chat on a wide screen; folded above it on a phone.
  const settingsBox = h("details", { class: "settings-toggle", open: !window.matchMedia("(max-width: 900px)").matches },
    h("summary", {}, "Settings"), form.el);

  const refresh = () => fillEndpoints(form.endpoint, ctx, CHAT, empty);
  window.addEventListener("fmapi:models", refresh);
  refresh();

  section.append(
    h("p", { class: "lede" }, "Chat with an endpoint. Answers stream as they are generated."),
    h("div", { class: "playground" },
      h("aside", { class: "card", "aria-label": "Settings" }, settingsBox),
      h("div", { class: "card chat" }, empty.el, log.el, error.el, composer)),
    dialog.el);
}

export default {
  id: "playground",
  title: "Playground",
  create: build,
  shown(ctx) {
    ctx.refreshModels().catch(() => {});
  },
};
