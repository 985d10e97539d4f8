// The console's shell: sign-in state, the page list, hash routing (#/playground, ...) and the
// endpoints the token may query. Each page is built once, on first visit, and kept (a stream in
// the Playground goes on while you look at another page).
import * as api from "./api.js";
import { h, announce } from "./dom.js";
import signin from "./pages/signin.js";
import playground from "./pages/playground.js";
import compare from "./pages/compare.js";
import embeddings from "./pages/embeddings.js";
import endpoints from "./pages/endpoints.js";
import usage from "./pages/usage.js";
import tokens from "./pages/tokens.js";

const PAGES = [playground, compare, embeddings, endpoints, usage, tokens];
const DEFAULT = "playground";

const ctx = {
  session: null, // {admin, principal}
  models: [], // [{id, task}] from /v1/models: what this token may query
  endpointsFor(task) {
    return ctx.models.filter((m) => m.task === task).map((m) => m.id);
  },
  async refreshModels() {
    const r = await api.get("/v1/models");
    ctx.models = (r.data || []).map((m) => ({ id: m.id, task: m.task || "" }));
    window.dispatchEvent(new CustomEvent("fmapi:models"));
    return ctx.models;
  },
  announce,
};

const built = new Map(); // page id -> {page, section}
const main = document.getElementById("main");

/**
 * Who the token is: any valid token lists its endpoints (/v1/models); the usage API says whose
 * records it answers with (null: everyone's, i.e. an admin token). Without a usage service, the
 * token list (admins only) tells.
 */
async function establish(secret) {
  const models = await api.get("/v1/models", { secret });
  let admin = false;
  let principal = null;
  try {
    const u = await api.get("/api/2.0/usage?since=1m&by=endpoint", { secret });
    admin = u.principal === null || u.principal === undefined;
    principal = u.principal || null;
  } catch (err) {
    if (err.status === 401) throw err;
    try {
      await api.get("/api/2.0/token/list", { secret });
      admin = true;
    } catch (err2) {
      if (err2.status === 401) throw err2;
    }
  }
  ctx.models = (models.data || []).map((m) => ({ id: m.id, task: m.task || "" }));
  ctx.session = { admin, principal };
}

function renderNav() {
  const list = document.getElementById("nav-list");
  list.replaceChildren(...PAGES.filter((p) => !p.admin || ctx.session.admin).map((p) =>
    h("li", {}, h("a", { href: `#/${p.id}`, "data-page": p.id }, p.title))));
  document.getElementById("nav").hidden = false;
  const who = document.getElementById("session-who");
  who.textContent = ctx.session.admin
    ? (ctx.session.principal ? `${ctx.session.principal} (admin)` : "admin token")
    : `signed in as ${ctx.session.principal || "a token"}`;
  document.getElementById("session").hidden = false;
}

function signOut(message) {
  api.token.clear();
  if (message) window.sessionStorage.setItem("fmapi.console.notice", message);
  // A reload drops everything the pages hold (conversations, a token secret on screen).
  window.location.replace(`${window.location.pathname}#/signin`);
  window.location.reload();
}

function pageId() {
  const m = /^#\/([a-z-]+)/.exec(window.location.hash);
  return m ? m[1] : null;
}

let showing = null;

function show(id, { focus = true } = {}) {
  let page = PAGES.find((p) => p.id === id);
  if (!page) {
    id = DEFAULT;
    page = PAGES.find((p) => p.id === id);
  }
  for (const [pid, b] of built) b.section.hidden = pid !== id;
  let b = built.get(id);
  if (!b) {
    const section = h("section", { class: "page", id: `page-${id}`, "aria-labelledby": `h-${id}` });
    section.append(h("h1", { id: `h-${id}`, tabindex: "-1" }, page.title));
    if (page.admin && !ctx.session.admin) {
      section.append(h("p", { class: "notice error", role: "alert" },
        "This page needs an admin token. Sign in with one to manage tokens."));
    } else {
      page.create(section, ctx);
    }
    main.append(section);
    b = { page, section };
    built.set(id, b);
  }
  b.section.hidden = false;
  for (const a of document.querySelectorAll("#nav-list a")) {
    if (a.dataset.page === id) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${page.title} · fmapi console`;
  if (b.page.shown && !(page.admin && !ctx.session.admin)) b.page.shown(ctx);
  if (focus && showing !== null) b.section.querySelector("h1").focus();
  showing = id;
}

function showSignin(message) {
  main.replaceChildren();
  const section = h("section", { class: "page signin-page", "aria-labelledby": "h-signin" });
  main.append(section);
  signin.create(section, {
    message,
    async submit(secret) {
      await establish(secret);
      api.token.set(secret);
      start();
    },
  });
}

function start() {
  main.replaceChildren();
  renderNav();
  if (!pageId() || pageId() === "signin") window.history.replaceState(null, "", `#/${DEFAULT}`);
  show(pageId(), { focus: false });
}

async function boot() {
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  window.addEventListener(api.UNAUTHORIZED_EVENT, (ev) =>
    signOut(`Signed out: the server no longer accepts this token (${ev.detail}).`));
  window.addEventListener("hashchange", () => {
    if (ctx.session && pageId()) show(pageId());
  });
  const notice = window.sessionStorage.getItem("fmapi.console.notice");
  window.sessionStorage.removeItem("fmapi.console.notice");
  const secret = api.token.get();
  if (!secret) {
    showSignin(notice);
    return;
  }
  try {
    await establish(secret);
  } catch (err) {
    api.token.clear();
    showSignin(api.describe(err));
    return;
  }
  start();
}

boot();
