// The public REST API, called with the token the user pasted. The token lives in this tab's
// sessionStorage only (gone when the tab closes), travels only in the Authorization header of
// same-origin calls, and is never put in a URL, a cookie or the console's log.

const TOKEN_KEY = "fmapi.console.token";

export const token = {
  get() {
    return window.sessionStorage.getItem(TOKEN_KEY);
  },
  set(value) {
    window.sessionStorage.setItem(TOKEN_KEY, value);
  },
  clear() {
    window.sessionStorage.removeItem(TOKEN_KEY);
  },
};

export class ApiError extends Error {
  constructor(status, message, code, requestId) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code || "";
    this.requestId = requestId || "";
  }
}

/** Fired on a 401 from any call: the token was revoked or expired meanwhile. */
export const UNAUTHORIZED_EVENT = "fmapi:unauthorized";

function headers(secret, json) {
  const out = { accept: "application/json" };
  if (secret) out.authorization = `Bearer ${secret}`;
  if (json) out["content-type"] = "application/json";
  return out;
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`.trim();
  let code = "";
  try {
    const body = await res.json();
    message = body?.error?.message || body?.message || message;
    code = body?.error_code || body?.error?.code || "";
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(res.status, message, code, res.headers.get("x-request-id"));
}

async function send(method, path, { body, signal, secret } = {}) {
  const key = secret === undefined ? token.get() : secret;
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: headers(key, body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
      referrerPolicy: "no-referrer",
    });
  } catch (err) {
    if (err?.name === "AbortError") throw err;
    throw new ApiError(0, `the server could not be reached (${err?.message || err})`);
  }
  if (!res.ok) {
    const err = await errorOf(res);
    if (res.status === 401 && secret === undefined) {
      window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT, { detail: err.message }));
    }
    throw err;
  }
  return res;
}

export async function get(path, opts) {
  return (await send("GET", path, opts)).json();
}

export async function post(path, body, opts = {}) {
  return (await send("POST", path, { ...opts, body })).json();
}

/**
 * POST a streaming request and yield each server-sent event's JSON (`data: {...}`), until
 * `data: [DONE]`. An event carrying an `error` is thrown as an ApiError (as the OpenAI SDK does).
 * Aborting `signal` closes the connection: the gateway sees the client leave and the engine
 * aborts the request.
 */
export async function* stream(path, body, signal) {
  const res = await send("POST", path, { body, signal });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let busySince = performance.now();
  try {
    for (;;) {
      // Data already buffered resolves read() at once, without leaving the microtask queue:
      // yield now and then so clicks (Stop) and painting get their turn on a fast stream.
      if (performance.now() - busySince > 40) {
        await new Promise((resolve) => window.setTimeout(resolve, 0));
        busySince = performance.now();
      }
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const msg = JSON.parse(data);
        if (msg && msg.error) {
          const e = msg.error;
          throw new ApiError(200, e.message || String(e), msg.error_code || e.code, res.headers.get("x-request-id"));
        }
        yield msg;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** A readable sentence for an error thrown by the calls above. */
export function describe(err) {
  if (err?.name === "AbortError") return "Stopped.";
  if (err instanceof ApiError) {
    const rid = err.requestId ? ` (request ${err.requestId})` : "";
    if (err.status === 401) return `Not signed in: ${err.message}`;
    if (err.status === 403) return `Not allowed: ${err.message}`;
    if (err.status === 429) return `Rate limited: ${err.message}`;
    return `${err.message}${rid}`;
  }
  return String(err?.message || err);
}
