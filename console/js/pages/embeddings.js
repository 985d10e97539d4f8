// Embeddings: a few sentences in, their cosine-similarity matrix out, as a heat map.
import { h, field, select, notice, fmt, announce } from "../dom.js";
import * as api from "../api.js";
import { cosineMatrix, heatMap } from "../charts.js";
import { fillEndpoints } from "./playground.js";

const EMBEDDINGS = "llm/v1/embeddings";
const MAX_SENTENCES = 32;
const EXAMPLE = [
  "A cat sits on the mat.",
  "A kitten rests on a rug.",
  "The stock market fell sharply today.",
  "Shares dropped at the close of trading.",
].join("\n");

function build(section, ctx) {
  const endpoint = select([], { id: "emb-endpoint" });
  const text = h("textarea", { id: "emb-input", rows: "6", spellcheck: "false" });
  text.value = EXAMPLE;
  const go = h("button", { type: "submit", id: "emb-go" }, "Compute similarity");
  const empty = notice("info");
  const error = notice("error");
  const stats = h("p", { class: "muted", id: "emb-stats", role: "status" });
  const out = h("div", { id: "emb-result" });

  const form = h("form", { class: "card" },
    field("Endpoint", endpoint),
    field("Sentences", text, `One per line, up to ${MAX_SENTENCES}.`),
    h("div", { class: "row" }, go), error.el);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const sentences = text.value.split("\n").map((x) => x.trim()).filter(Boolean);
    if (sentences.length < 2) {
      error.show("Give at least two sentences, one per line.");
      return;
    }
    if (sentences.length > MAX_SENTENCES) {
      error.show(`At most ${MAX_SENTENCES} sentences at a time.`);
      return;
    }
    error.clear();
    go.disabled = true;
    stats.textContent = "Embedding…";
    const started = performance.now();
    try {
      const r = await api.post("/v1/embeddings", { model: endpoint.value, input: sentences, encoding_format: "float" });
      const ms = performance.now() - started;
      const vectors = r.data.slice().sort((a, b) => a.index - b.index).map((d) => d.embedding);
      out.replaceChildren(heatMap(sentences, cosineMatrix(vectors)));
      stats.textContent = `${sentences.length} sentences · ${vectors[0].length} dimensions · `
        + `${fmt.int(r.usage?.prompt_tokens)} tokens · ${fmt.ms(ms)}`;
      announce("Similarity matrix ready.");
    } catch (e) {
      stats.textContent = "";
      error.show(api.describe(e));
    } finally {
      go.disabled = false;
    }
  });

  const refresh = () => fillEndpoints(endpoint, ctx, EMBEDDINGS, empty);
  window.addEventListener("fmapi:models", refresh);
  refresh();

  section.append(
    h("p", { class: "lede" }, "Embed a few sentences and see how alike they are: the cosine similarity of every pair."),
    empty.el, form, h("div", { class: "card" }, stats, out));
}

export default {
  id: "embeddings",
  title: "Embeddings",
  create: build,
  shown(ctx) {
    ctx.refreshModels().catch(() => {});
  },
};
