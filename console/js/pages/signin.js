// Sign in with an API token: checked against the API before it is kept (in sessionStorage).
import { h, field, notice } from "../dom.js";
import { describe } from "../api.js";

export default {
  id: "signin",
  title: "Sign in",
  create(section, { message, submit }) {
    const input = h("input", {
      type: "password", id: "token-input", autocomplete: "off", spellcheck: "false",
      autocapitalize: "off", required: true,
    });
    const err = notice("error");
    const button = h("button", { type: "submit" }, "Sign in");
    // No action, no input name and the CSP's form-action 'none': the token can never be
    // submitted as a form (into a URL), even if this script did not run.
    const form = h("form", { class: "card signin", novalidate: true },
      field("API token", input, "Paste a token made by `fmapi tokens create` (or the one in .fmapi/dev-token). "
        + "It stays in this browser tab's session storage and is sent only in the Authorization header."),
      err.el,
      h("div", { class: "row" }, button));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const secret = input.value.trim();
      if (!secret) {
        err.show("Paste your API token first.");
        input.focus();
        return;
      }
      button.disabled = true;
      err.show("Checking the token…", "info");
      try {
        await submit(secret);
      } catch (e) {
        const text = e.status === 401
          ? `That token was not accepted: it is unknown, revoked or expired (${e.message}).`
          : `Could not sign in: ${describe(e)}`;
        err.show(text, "error");
        input.select();
        input.focus();
      } finally {
        button.disabled = false;
      }
    });
    section.append(h("h1", { id: "h-signin", tabindex: "-1" }, "Sign in"),
      h("p", { class: "lede" }, "Try models, compare them, and watch your usage on this fmapi server."),
      form);
    if (message) err.show(message, "error");
    input.focus();
  },
};
