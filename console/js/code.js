// "View code": the call the Playground makes, as curl, Python (the openai SDK) and Node (the
// openai package). The token is never written into a snippet: they read OPENAI_API_KEY.
import { h, copyText, uid } from "./dom.js";
import { chatUrl } from "./chat.js";

// Parameters the OpenAI SDKs take as named arguments; anything else goes in extra_body (Python).
const SDK_PARAMS = new Set([
  "model", "messages", "temperature", "max_tokens", "top_p", "stop", "seed", "response_format",
  "stream", "stream_options", "n", "presence_penalty", "frequency_penalty", "logprobs",
  "top_logprobs", "tools", "tool_choice", "user", "logit_bias",
]);

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

function py(value, indent = 0) {
  const pad = " ".repeat(indent + 4);
  const end = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => pad + py(v, indent + 4)).join(",\n")},\n${end}]`;
  }
  const keys = Object.keys(value);
  if (!keys.length) return "{}";
  return `{\n${keys.map((k) => `${pad}${JSON.stringify(k)}: ${py(value[k], indent + 4)}`).join(",\n")},\n${end}}`;
}

function baseUrl(path) {
  return `${window.location.origin}${path === "databricks" ? "/serving-endpoints" : "/v1"}`;
}

export function curlSnippet({ path, endpoint, body }) {
  const url = `${window.location.origin}${chatUrl(path, endpoint)}`;
  return [
    "# export OPENAI_API_KEY=<your fmapi token>",
    `curl -N ${url} \\`,
    '  -H "Authorization: Bearer $OPENAI_API_KEY" \\',
    '  -H "Content-Type: application/json" \\',
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

export function pythonSnippet({ path, endpoint, body }) {
  const args = { model: endpoint, ...body };
  args.model = endpoint;
  const extra = {};
  const named = [];
  for (const [k, v] of Object.entries(args)) {
    if (SDK_PARAMS.has(k)) named.push([k, v]);
    else extra[k] = v;
  }
  if (Object.keys(extra).length) named.push(["extra_body", extra]);
  const stream = !!body.stream;
  return [
    "# pip install openai; export OPENAI_API_KEY=<your fmapi token>",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(baseUrl(path))})`,
    `${stream ? "stream" : "response"} = client.chat.completions.create(`,
    ...named.map(([k, v]) => `    ${k}=${py(v, 4)},`),
    ")",
    ...(stream
      ? [
          "for chunk in stream:",
          "    if chunk.choices:",
          '        print(chunk.choices[0].delta.content or "", end="", flush=True)',
          "    if chunk.usage:",
          "        print(\"\\n\", chunk.usage)",
        ]
      : ["print(response.choices[0].message.content)"]),
  ].join("\n");
}

export function nodeSnippet({ path, endpoint, body }) {
  const args = { model: endpoint, ...body };
  args.model = endpoint;
  const stream = !!body.stream;
  const literal = JSON.stringify(args, null, 2);
  return [
    "// npm install openai; export OPENAI_API_KEY=<your fmapi token>",
    'import OpenAI from "openai";',
    "",
    `const client = new OpenAI({ baseURL: ${JSON.stringify(baseUrl(path))} });`,
    `const ${stream ? "stream" : "response"} = await client.chat.completions.create(${literal});`,
    ...(stream
      ? [
          "for await (const chunk of stream) {",
          '  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");',
          "  if (chunk.usage) console.log(\"\\n\", chunk.usage);",
          "}",
        ]
      : ["console.log(response.choices[0].message.content);"]),
  ].join("\n");
}

const LANGS = [
  { id: "curl", label: "curl", make: curlSnippet },
  { id: "python", label: "Python", make: pythonSnippet },
  { id: "node", label: "Node", make: nodeSnippet },
];

/** A modal <dialog> with one tab per language; `open(call)` shows it for {path, endpoint, body}. */
export function codeDialog() {
  const titleId = uid("code-title");
  const tabs = [];
  const panels = [];
  const copyStatus = h("span", { class: "muted", role: "status" });
  let current = 0;
  let call = null;

  const tablist = h("div", { role: "tablist", "aria-label": "Language", class: "tabs" });
  LANGS.forEach((lang, i) => {
    const tabId = uid("tab");
    const panelId = uid("panel");
    const tab = h("button", {
      type: "button", role: "tab", id: tabId, "aria-controls": panelId, class: "tab",
      "data-lang": lang.id, onclick: () => select(i),
    }, lang.label);
    tab.addEventListener("keydown", (ev) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
      if (step) {
        ev.preventDefault();
        select((current + step + LANGS.length) % LANGS.length, true);
      }
    });
    const code = h("code", { class: `lang-${lang.id}` });
    const panel = h("div", { role: "tabpanel", id: panelId, "aria-labelledby": tabId, hidden: true },
      h("pre", { class: "code", tabindex: "0" }, code));
    tabs.push(tab);
    panels.push({ panel, code, lang });
    tablist.append(tab);
  });

  function select(i, focus = false) {
    current = i;
    tabs.forEach((t, j) => {
      t.setAttribute("aria-selected", String(i === j));
      t.tabIndex = i === j ? 0 : -1;
      panels[j].panel.hidden = i !== j;
    });
    copyStatus.textContent = "";
    if (focus) tabs[i].focus();
  }

  const copy = h("button", {
    type: "button", class: "secondary",
    onclick: async () => {
      const text = panels[current].code.textContent;
      copyStatus.textContent = (await copyText(text)) ? "Copied." : "Select the code and copy it (Ctrl+C).";
    },
  }, "Copy");
  const close = h("button", { type: "button", onclick: () => dialog.close() }, "Close");
  const dialog = h("dialog", { class: "code-dialog", "aria-labelledby": titleId },
    h("div", { class: "dialog-head" },
      h("h2", { id: titleId }, "The same call in code"), close),
    h("p", { class: "muted" }, "Set OPENAI_API_KEY to your token first; the snippets never contain it."),
    tablist,
    panels.map((p) => p.panel),
    h("div", { class: "row" }, copy, copyStatus));
  select(0);

  return {
    el: dialog,
    open(c) {
      call = c;
      for (const p of panels) p.code.textContent = p.lang.make(call);
      select(current);
      dialog.showModal();
    },
  };
}
