// Tokens (admin tokens only): create one (its secret shown once, with a copy button), list
// them, revoke one. The token REST API: /api/2.0/token/create, /list, /delete.
import { h, field, checkbox, select, notice, fmt, copyText, announce } from "../dom.js";
import * as api from "../api.js";

const LIFETIMES = [
  { value: "0", label: "Never expires" },
  { value: String(3600), label: "1 hour" },
  { value: String(86400), label: "1 day" },
  { value: String(7 * 86400), label: "7 days" },
  { value: String(30 * 86400), label: "30 days" },
  { value: String(90 * 86400), label: "90 days" },
];

function build(section) {
  const comment = h("input", { type: "text", id: "tok-comment", maxlength: "200", placeholder: "what it is for" });
  const principal = h("input", { type: "text", id: "tok-principal", autocomplete: "off", placeholder: "yours" });
  const endpoints = h("input", { type: "text", id: "tok-endpoints", placeholder: "same as yours", spellcheck: "false" });
  const lifetime = select(LIFETIMES, { id: "tok-lifetime" });
  lifetime.value = String(30 * 86400);
  const admin = checkbox("Admin token (may manage tokens and endpoints)", { id: "tok-admin" });
  const create = h("button", { type: "submit", id: "tok-create" }, "Create token");
  const createError = notice("error");
  const secretBox = h("div", { class: "card secret", id: "tok-secret-box", hidden: true });
  const listError = notice("error");
  const tbody = h("tbody");
  const status = h("p", { class: "muted", role: "status" });

  const form = h("form", { class: "card", "aria-labelledby": "tok-create-h" },
    h("h2", { id: "tok-create-h" }, "Create a token"),
    h("div", { class: "grid-2" },
      field("Comment", comment),
      field("Principal", principal, "The user or service principal it acts as (default: yours)."),
      field("Endpoints", endpoints, "Names or patterns such as chat-*, comma-separated (default: your own)."),
      field("Lifetime", lifetime)),
    admin.el, createError.el, h("div", { class: "row" }, create));

  function showSecret(made) {
    const value = h("input", { type: "text", readonly: true, id: "tok-secret", value: made.token_value, class: "mono", spellcheck: "false" });
    const copyStatus = h("span", { class: "muted", role: "status" });
    const copy = h("button", { type: "button", id: "tok-copy", onclick: async () => {
      if (await copyText(value.value)) copyStatus.textContent = "Copied to the clipboard.";
      else {
        value.select();
        copyStatus.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
      }
    } }, "Copy");
    const done = h("button", { type: "button", class: "secondary", onclick: () => {
      secretBox.replaceChildren();
      secretBox.hidden = true;
      comment.focus();
    } }, "I have copied it");
    secretBox.replaceChildren(
      h("h2", { tabindex: "-1" }, `Token ${made.token_info.token_id} created`),
      h("p", { class: "notice warn" }, "Copy the secret now: it is shown only this once and cannot be read back."),
      field("Secret", value), h("div", { class: "row" }, copy, done, copyStatus));
    secretBox.hidden = false;
    secretBox.querySelector("h2").focus();
  }

  function row(t) {
    const revoke = h("button", { type: "button", class: "danger small", "data-revoke": t.token_id,
      "aria-label": `Revoke token ${t.token_id}` }, "Revoke");
    const cell = h("td", {}, revoke);
    revoke.addEventListener("click", () => {
      const yes = h("button", { type: "button", class: "danger small", "data-confirm": t.token_id }, "Yes, revoke");
      const no = h("button", { type: "button", class: "secondary small" }, "Cancel");
      const q = h("span", { class: "confirm" }, `Revoke ${t.token_id}? `, yes, no);
      cell.replaceChildren(q);
      yes.focus();
      no.addEventListener("click", () => {
        cell.replaceChildren(revoke);
        revoke.focus();
      });
      yes.addEventListener("click", async () => {
        yes.disabled = true;
        try {
          await api.post("/api/2.0/token/delete", { token_id: t.token_id });
          announce(`Token ${t.token_id} revoked.`);
          await load();
        } catch (e) {
          listError.show(api.describe(e));
          cell.replaceChildren(revoke);
        }
      });
    });
    return h("tr", { "data-token": t.token_id },
      h("th", { scope: "row", class: "mono" }, t.token_id),
      h("td", { "data-label": "Comment" }, t.comment || h("span", { class: "muted" }, "—")),
      h("td", { "data-label": "Principal" }, t.principal),
      h("td", { "data-label": "Endpoints" }, (t.endpoints || []).join(", ") || h("span", { class: "muted" }, "none")),
      h("td", { "data-label": "Admin" }, t.admin ? "yes" : "no"),
      h("td", { "data-label": "Created" }, fmt.time(t.creation_time)),
      h("td", { "data-label": "Expires" }, t.expiry_time > 0 ? fmt.time(t.expiry_time) : "never"),
      h("td", { "data-label": "Last used" }, t.last_used_time > 0 ? fmt.time(t.last_used_time) : "never"),
      cell);
  }

  async function load() {
    try {
      const r = await api.get("/api/2.0/token/list");
      const list = (r.token_infos || []).sort((a, b) => (b.creation_time || 0) - (a.creation_time || 0));
      tbody.replaceChildren(...list.map(row));
      status.textContent = `${list.length} active token${list.length === 1 ? "" : "s"}.`;
      listError.clear();
    } catch (e) {
      listError.show(api.describe(e));
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { comment: comment.value.trim(), lifetime_seconds: Number(lifetime.value) };
    if (principal.value.trim()) body.principal = principal.value.trim();
    const eps = endpoints.value.split(",").map((x) => x.trim()).filter(Boolean);
    if (eps.length) body.endpoints = eps;
    if (admin.input.checked) body.admin = true;
    create.disabled = true;
    try {
      const made = await api.post("/api/2.0/token/create", body);
      createError.clear();
      form.reset();
      lifetime.value = String(30 * 86400);
      showSecret(made);
      await load();
    } catch (e) {
      createError.show(api.describe(e));
    } finally {
      create.disabled = false;
    }
  });

  const table = h("table", { class: "data tokens stack" },
    h("caption", { class: "visually-hidden" }, "Active tokens"),
    h("thead", {}, h("tr", {}, ["Token id", "Comment", "Principal", "Endpoints", "Admin", "Created", "Expires", "Last used", "Action"]
      .map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  section.append(
    h("p", { class: "lede" }, "API tokens: create, list and revoke. Only admin tokens see this page's data."),
    form, secretBox,
    h("div", { class: "card" }, h("h2", {}, "Active tokens"), status, listError.el, h("div", { class: "scroll-x" }, table)));
  return load;
}

let loader = null;

export default {
  id: "tokens",
  title: "Tokens",
  admin: true,
  create(section) {
    loader = build(section);
  },
  shown() {
    if (loader) loader();
  },
};
