// Building the page without HTML strings: the Content-Security-Policy refuses string-to-HTML
// sinks (Trusted Types), so every element is made with createElement and text is always text.

let seq = 0;

/** A fresh id for pairing a label with its control. */
export function uid(prefix = "id") {
  seq += 1;
  return `${prefix}-${seq}`;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k === "text") el.textContent = String(v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value" && "value" in el) el.value = v;
    else if (k === "checked" && "checked" in el) el.checked = !!v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
}

function appendAll(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

/** h("button", {class: "x", onclick: f}, "Send") */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "text") el.textContent = String(v);
    else el.setAttribute(k, String(v));
  }
  appendAll(el, children);
  return el;
}

/** A labelled control: <div class="field"><label for=id>text</label>control<small>hint</small></div> */
export function field(label, control, hint) {
  if (!control.id) control.id = uid("f");
  const parts = [h("label", { for: control.id }, label), control];
  if (hint) {
    const hid = uid("hint");
    control.setAttribute("aria-describedby", hid);
    parts.push(h("small", { id: hid, class: "hint" }, hint));
  }
  return h("div", { class: "field" }, parts);
}

export function checkbox(label, attrs) {
  const input = h("input", { type: "checkbox", id: uid("cb"), ...attrs });
  return { input, el: h("div", { class: "field check" }, input, h("label", { for: input.id }, label)) };
}

export function select(options, attrs) {
  const el = h("select", attrs);
  setOptions(el, options);
  return el;
}

/** Replace a <select>'s options ([{value, label}] or strings), keeping the choice if it stays. */
export function setOptions(sel, options, keep = sel.value) {
  const opts = options.map((o) => (typeof o === "string" ? { value: o, label: o } : o));
  sel.replaceChildren(...opts.map((o) => h("option", { value: o.value }, o.label)));
  if (opts.some((o) => o.value === keep)) sel.value = keep;
}

/** A message box: kind "error" (role alert), "info" or "ok"; empty text hides it. */
export function notice(kind = "error") {
  const el = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status", hidden: true });
  return {
    el,
    show(text, k = kind) {
      el.className = `notice ${k}`;
      el.setAttribute("role", k === "error" ? "alert" : "status");
      el.textContent = text;
      el.hidden = !text;
    },
    clear() {
      el.textContent = "";
      el.hidden = true;
    },
  };
}

export const fmt = {
  int(n) {
    return Number(n || 0).toLocaleString("en-US");
  },
  ms(ms) {
    if (ms === null || ms === undefined) return "–";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  },
  time(ms) {
    if (!ms || ms < 0) return "–";
    return new Date(Number(ms)).toISOString().replace("T", " ").slice(0, 16) + " UTC";
  },
};

/** Copy text to the clipboard; false when the browser refused (the caller says how to copy). */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}

/** Announce a short message to screen readers (the page's polite live region). */
export function announce(text) {
  const el = document.getElementById("announcer");
  if (!el) return;
  el.textContent = "";
  window.setTimeout(() => {
    el.textContent = text;
  }, 30);
}
