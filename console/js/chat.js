// One streamed chat call, shared by the Playground and Compare pages.
import * as api from "./api.js";

/** Where a chat goes: OpenAI's path (model in the body) or Databricks' per-endpoint path. */
export const PATHS = [
  { value: "openai", label: "OpenAI: /v1/chat/completions" },
  { value: "databricks", label: "Databricks: /serving-endpoints/{name}/invocations" },
];

export function chatUrl(path, endpoint) {
  return path === "databricks"
    ? `/serving-endpoints/${encodeURIComponent(endpoint)}/invocations`
    : "/v1/chat/completions";
}

function num(value) {
  if (value === undefined || value === null || String(value).trim() === "") return undefined;
  const n = Number(value);
  return Number.isFinite(n) ? n : undefined;
}

/**
 * The request body for `settings` ({temperature, maxTokens, topP, stop, seed, json, extra})
 * and `messages`. Empty settings are left out (the endpoint's defaults apply). `extra` is a
 * JSON object of other parameters (top_k, penalties, ...), merged in last.
 */
export function chatBody({ path, endpoint, messages, settings = {}, stream = true }) {
  const body = {};
  if (path !== "databricks") body.model = endpoint;
  body.messages = messages;
  const opt = {
    temperature: num(settings.temperature),
    max_tokens: num(settings.maxTokens),
    top_p: num(settings.topP),
    seed: num(settings.seed),
  };
  for (const [k, v] of Object.entries(opt)) if (v !== undefined) body[k] = v;
  const stop = (settings.stop || []).filter((x) => x !== "");
  if (stop.length === 1) body.stop = stop[0];
  else if (stop.length > 1) body.stop = stop;
  if (settings.json) body.response_format = { type: "json_object" };
  for (const [k, v] of Object.entries(settings.extra || {})) {
    if (!["model", "messages", "stream", "stream_options"].includes(k)) body[k] = v;
  }
  if (stream) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  return body;
}

/** Parse the "extra parameters" box: "" is {}, anything else must be a JSON object. */
export function parseExtra(text) {
  const t = (text || "").trim();
  if (!t) return {};
  let v;
  try {
    v = JSON.parse(t);
  } catch (e) {
    throw new Error(`Extra parameters are not valid JSON: ${e.message}`);
  }
  if (!v || typeof v !== "object" || Array.isArray(v)) {
    throw new Error("Extra parameters must be a JSON object, e.g. {\"top_k\": 40}");
  }
  return v;
}

/**
 * Stream one answer. `onText(delta)` gets each piece of text as it arrives. Resolves with
 * {text, usage, ttftMs, totalMs, finishReason, stopped}; a stop (signal aborted) resolves with
 * what had arrived and stopped=true; a refusal or a mid-stream error rejects with an ApiError.
 */
export async function runChat({ path, endpoint, body, signal, onText }) {
  const started = performance.now();
  const out = { text: "", usage: null, ttftMs: null, totalMs: null, finishReason: null, stopped: false };
  try {
    for await (const chunk of api.stream(chatUrl(path, endpoint), body, signal)) {
      if (chunk.usage) out.usage = chunk.usage;
      // The first choice only (with n > 1, each chunk carries one choice, named by its index).
      const choice = (chunk.choices || []).find((c) => (c.index ?? 0) === 0);
      if (!choice) continue;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        if (out.ttftMs === null) out.ttftMs = performance.now() - started;
        out.text += delta;
        onText(delta);
      }
      if (choice.finish_reason) out.finishReason = choice.finish_reason;
    }
  } catch (err) {
    if (err?.name !== "AbortError") throw err;
    out.stopped = true;
  }
  out.totalMs = performance.now() - started;
  return out;
}

/** "TTFT 120 ms · 12 in / 48 out tokens · 1.20 s · 40 tokens/s · finish: length" */
export function summary(result) {
  const parts = [`TTFT ${result.ttftMs === null ? "–" : `${Math.round(result.ttftMs)} ms`}`];
  const u = result.usage;
  if (u) parts.push(`${u.prompt_tokens} in / ${u.completion_tokens} out tokens`);
  parts.push(`total ${(result.totalMs / 1000).toFixed(2)} s`);
  // The decode rate after the first token; not shown when the rest arrived in one burst
  // (a rate over a few milliseconds says nothing).
  if (u && u.completion_tokens > 1 && result.ttftMs !== null &&
      result.totalMs - result.ttftMs >= 50) {
    const rate = (u.completion_tokens - 1) / ((result.totalMs - result.ttftMs) / 1000);
    if (rate > 0 && Number.isFinite(rate)) parts.push(`${rate.toFixed(1)} tokens/s`);
  }
  if (result.stopped) parts.push("stopped");
  else if (result.finishReason) parts.push(`finish: ${result.finishReason}`);
  return parts.join(" · ");
}
