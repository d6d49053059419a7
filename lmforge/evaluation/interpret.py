"""Why a model said what it said: attention maps, the logit lens and token attributions, as PNGs and HTML.

Everything runs the normal model code. Attention weights come from the same attention module
that generates (it writes them out only while `recording_attention` is on); the logit lens
reads the residual stream between blocks; attributions differentiate a chosen logit with
respect to the input embeddings (gradient x input, integrated gradients).
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

MAX_HTML_TOKENS = 256

# `progress(done, total)` after each unit of a long step; `explain` takes `progress(stage, done, total)`.
Progress = Callable[[int, int], None]


@contextmanager
def recording_attention(model: torch.nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Within the block, every attention call of `model` appends its weights (B, heads, T, S) to the yielded
    per-layer lists."""
    layers = [module for module in model.modules() if hasattr(module, "attention_record")]
    records: list[list[torch.Tensor]] = [[] for _ in layers]
    for layer, record in zip(layers, records):
        layer.attention_record = record
    try:
        yield records
    finally:
        for layer in layers:
            layer.attention_record = None


@torch.no_grad()
def attention_maps(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """(layers, heads, T, T) attention weights of one sequence `tokens` (T,): row i is where position i looks."""
    with recording_attention(model) as records:
        model(tokens[None])
    return torch.stack([record[-1][0] for record in records]).float().cpu()


@torch.no_grad()
def logit_lens(model: Transformer, tokens: torch.Tensor, top_k: int = 5) -> list[dict]:
    """What each layer would predict next at the last position if it were the last layer
    (nostalgebraist 2020): the final norm and LM head applied to the residual stream after each block.

    Returns one row per layer (0 = the embeddings): top-k token ids and probabilities, and the
    probability given to the model's final choice.
    """
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _, __, output: captured.append(output)) for block in model.blocks]
    embedded: list[torch.Tensor] = []
    hooks.append(model.token_embedding.register_forward_hook(lambda _, __, output: embedded.append(output)))
    try:
        logits, _ = model(tokens[None])
    finally:
        for hook in hooks:
            hook.remove()
    final_choice = int(logits[0, -1].argmax())
    streams = [embedded[0]] + captured  # the embeddings stand in for "layer 0" (positions added by RoPE later)
    rows = []
    for layer, stream in enumerate(streams):
        probabilities = model.logits(model.final_norm(stream[0, -1])).float().softmax(-1)
        top = probabilities.topk(top_k)
        rows.append(
            {
                "layer": layer,
                "top_ids": top.indices.tolist(),
                "top_probabilities": top.values.tolist(),
                "final_choice_probability": float(probabilities[final_choice]),
            }
        )
    return rows


def with_input_embeddings(output: Callable[[], torch.Tensor], embedding: torch.nn.Module):
    """f(embeddings): `output()` computed by the model's own forward, with `embedding`'s output replaced
    by `embeddings` (1, T, d). Attributions differentiate this; no second copy of the forward pass."""

    def function(embeddings: torch.Tensor) -> torch.Tensor:
        handle = embedding.register_forward_hook(lambda module, inputs, result: embeddings)
        try:
            return output()
        finally:
            handle.remove()

    return function


def _next_token_logit(model: Transformer, tokens: torch.Tensor, target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of input embeddings (1, T, d) → the logit of `target` after `tokens` (T,)."""
    return with_input_embeddings(
        lambda: model.logits(model.hidden_states(tokens[None])[:, -1])[:, target], model.token_embedding
    )


def gradient_x_input(function: Callable[[torch.Tensor], torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """Per-token attribution (T,): sum over the embedding of gradient * input (Shrikumar et al. 2016)."""
    embeddings = embeddings.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(function(embeddings).sum(), embeddings)
    return (gradient * embeddings).sum(-1)[0].detach()


def integrated_gradients(
    function: Callable[[torch.Tensor], torch.Tensor],
    embeddings: torch.Tensor,
    baseline: torch.Tensor | None = None,
    steps: int = 32,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Per-token attribution (T,) by integrated gradients (Sundararajan et al. 2017): (x - x') times the
    mean gradient along the straight path from the baseline x' (default: zeros) to x.

    The path integral uses `steps`-point Gauss-Legendre quadrature (as Captum does), exact for
    polynomials of degree 2 * steps - 1. Completeness: the attributions sum to f(x) - f(x').
    """
    import numpy as np

    embeddings = embeddings.detach()
    baseline = torch.zeros_like(embeddings) if baseline is None else baseline.detach()
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    total = torch.zeros_like(embeddings)
    for step, (node, weight) in enumerate(zip(nodes, weights), 1):
        alpha = (node + 1) / 2  # [-1, 1] → [0, 1]; the weights halve with the interval
        point = (baseline + float(alpha) * (embeddings - baseline)).requires_grad_(True)
        (gradient,) = torch.autograd.grad(function(point).sum(), point)
        total += float(weight / 2) * gradient
        if progress:
            progress(step, steps)
    return ((embeddings - baseline) * total).sum(-1)[0]


def mean_embedding_baseline(embedding: torch.nn.Embedding, length: int) -> torch.Tensor:
    """(1, length, d): the vocabulary's mean embedding at every position, the "no particular token" input.

    Not zeros: behind RMSNorm/LayerNorm a zero input sits on a cliff (the norm divides by ~sqrt(eps)),
    which no path integral with a few dozen steps resolves, so completeness fails from zero.
    """
    return embedding.weight.detach().float().mean(0).expand(1, length, -1)


def next_token_attributions(
    model: Transformer,
    tokens: torch.Tensor,
    target: int | None = None,
    method: str = "integrated_gradients",
    steps: int = 32,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, int]:
    """(attributions (T,), target id) for the model's next-token logit of `target` (default: its top choice).
    Integrated gradients start from `mean_embedding_baseline`."""
    with torch.no_grad():
        logits, _ = model(tokens[None])
    target = int(logits[0, -1].argmax()) if target is None else target
    embeddings = model.token_embedding(tokens[None]).detach().float()
    function = _next_token_logit(model, tokens, target)
    with torch.enable_grad():
        if method == "gradient_x_input":
            return gradient_x_input(function, embeddings), target
        if method == "integrated_gradients":
            baseline = mean_embedding_baseline(model.token_embedding, len(tokens))
            return integrated_gradients(function, embeddings, baseline, steps, progress), target
    raise ValueError(f"unknown attribution method {method!r}; known: gradient_x_input, integrated_gradients")


def classifier_attributions(classifier, tokens: torch.Tensor, label: int, steps: int = 32) -> torch.Tensor:
    """Integrated-gradients attribution (T,) of a `SequenceClassifier` logit for `label` over one text's
    tokens (T,), from `mean_embedding_baseline`."""
    backbone = classifier.backbone
    tokens = tokens.to(backbone.token_embedding.weight.device)
    mask = torch.ones(1, len(tokens), dtype=torch.long, device=tokens.device)
    function = with_input_embeddings(lambda: classifier(tokens[None], mask)[:, label], backbone.token_embedding)
    classifier.eval()
    embeddings = backbone.token_embedding(tokens[None]).detach().float()
    baseline = mean_embedding_baseline(backbone.token_embedding, len(tokens))
    with torch.enable_grad():
        return integrated_gradients(function, embeddings, baseline, steps).cpu()


# --- rendering ---------------------------------------------------------------------------


def token_strings(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (special tokens by name), for labels."""
    return [tokenizer.decode([i]) or f"<{i}>" for i in ids]


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_attention_pngs(
    maps: torch.Tensor, labels: list[str], folder: str | Path, progress: Progress | None = None
) -> list[Path]:
    """One PNG per layer: a grid of its heads' (T, T) heatmaps, queries down, keys across."""
    plt = _matplotlib()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, heads, length, _ = maps.shape
    columns = min(heads, 4)
    rows = -(-heads // columns)
    shown = [label.replace("\n", "\\n")[:12] for label in labels]
    paths = []
    for layer in range(layers):
        cell = max(2.2, 0.22 * length)
        figure, axes = plt.subplots(rows, columns, figsize=(cell * columns, cell * rows), squeeze=False)
        for head in range(rows * columns):
            axis = axes[head // columns][head % columns]
            if head >= heads:
                axis.axis("off")
                continue
            axis.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            axis.set_title(f"head {head}", fontsize=8)
            if length <= 40:
                axis.set_xticks(range(length), shown, rotation=90, fontsize=6)
                axis.set_yticks(range(length), shown, fontsize=6)
            else:
                axis.set_xticks([])
                axis.set_yticks([])
        figure.suptitle(f"layer {layer}: attention (row = query, column = key)")
        figure.tight_layout()
        path = folder / f"attention_layer_{layer:02d}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
        if progress:
            progress(layer + 1, layers)
    return paths


def save_logit_lens_png(rows: list[dict], tokenizer: Tokenizer, path: str | Path, title: str) -> Path:
    """A table, one line per layer: the top predictions and their probabilities, shaded by probability."""
    plt = _matplotlib()
    top_k = len(rows[0]["top_ids"])
    figure, axis = plt.subplots(figsize=(2.0 * top_k + 1.5, 0.32 * len(rows) + 1.2))
    probabilities = torch.tensor([row["top_probabilities"] for row in rows])
    axis.imshow(probabilities.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for r, row in enumerate(rows):
        for c, (token, probability) in enumerate(zip(row["top_ids"], row["top_probabilities"])):
            text = tokenizer.decode([token]).replace("\n", "\\n")[:14]
            colour = "white" if probability > 0.6 else "black"
            axis.text(c, r, f"{text!r} {probability:.2f}", ha="center", va="center", fontsize=7, color=colour)
    axis.set_yticks(range(len(rows)), [f"layer {row['layer']}" for row in rows], fontsize=7)
    axis.set_xticks(range(top_k), [f"#{i + 1}" for i in range(top_k)], fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def attributions_terminal(labels: list[str], scores: torch.Tensor) -> str:
    """Tokens on ANSI backgrounds: green pushes towards the decision, red away, brightness by size."""
    scale = float(scores.abs().max()) or 1.0
    pieces = []
    for label, score in zip(labels, scores.tolist()):
        level = int(round(abs(score) / scale * 4))
        colour = (22, 28, 34, 40, 46)[level] if score >= 0 else (52, 88, 124, 160, 196)[level]
        pieces.append(f"\033[48;5;{colour}m{label}\033[0m")
    return "".join(pieces)


def attributions_plain(labels: list[str], scores: torch.Tensor) -> str:
    """Each token with its score, for logs and pipes (where colours would be escape codes)."""
    return ", ".join(f"{label!r} {score:+.4f}" for label, score in zip(labels, scores.tolist()))


def _attribution_spans(labels: list[str], scores: torch.Tensor) -> str:
    scale = float(scores.abs().max()) or 1.0
    spans = []
    for label, score in zip(labels, scores.tolist()):
        alpha = abs(score) / scale
        rgb = "22,163,74" if score >= 0 else "220,38,38"
        spans.append(
            f'<span class="tok" style="background: rgba({rgb},{alpha:.3f})" title="{score:+.4f}">'
            f"{html.escape(label)}</span>"
        )
    return "".join(spans)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge explain: __TITLE__</title>
<style>
body { font: 14px/1.5 system-ui, sans-serif; margin: 24px; color: #111; max-width: 1100px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
.tok { white-space: pre; padding: 2px 1px; border-radius: 3px; font-family: ui-monospace, monospace; cursor: default; }
#tokens .tok:hover, #tokens .tok.active { outline: 2px solid #2563eb; }
.head-row { display: flex; align-items: baseline; gap: 8px; margin: 2px 0; }
.head-row .name { width: 64px; color: #555; font-size: 12px; flex: none; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
.note { color: #555; font-size: 13px; }
</style></head><body>
<h1>__TITLE__</h1>
<p class="note">Prediction after the prompt: <b id="prediction"></b>.
Attention comes from the same model code that generates.</p>
<h2>Attention</h2>
<label>layer <select id="layer"></select></label>
<p class="note">Hover (or click) a token: each line shows where one head of this layer attends from it.</p>
<div id="tokens"></div>
<div id="heads"></div>
<h2>Logit lens</h2>
<p class="note">The final norm and LM head applied after each layer, at the last position.</p>
<table id="lens"></table>
<h2>Token attributions</h2>
<p class="note">__ATTRIBUTION_NOTE__ Green pushes towards the prediction, red away.</p>
<div>__ATTRIBUTIONS__</div>
<script>
const data = __DATA__;
const layerSelect = document.getElementById("layer");
data.attention.forEach((_, i) => layerSelect.add(new Option(String(i), String(i))));
document.getElementById("prediction").textContent = JSON.stringify(data.prediction);
let active = data.tokens.length - 1;
function span(text, weight) {
  const s = document.createElement("span");
  s.className = "tok";
  s.textContent = text;
  s.style.background = `rgba(37,99,235,${weight.toFixed(3)})`;
  s.title = weight.toFixed(3);
  return s;
}
function drawTokens() {
  const box = document.getElementById("tokens");
  data.tokens.forEach((text, i) => {
    const s = span(text, 0);
    const choose = () => { active = i; draw(); };
    s.addEventListener("mouseenter", choose);
    s.addEventListener("click", choose);
    box.appendChild(s);
  });
}
function drawHeads() {
  const heads = data.attention[Number(layerSelect.value)];
  const box = document.getElementById("heads");
  box.replaceChildren();
  heads.forEach((rows, h) => {
    const line = document.createElement("div");
    line.className = "head-row";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `head ${h}`;
    line.appendChild(name);
    const weights = rows[active];
    data.tokens.forEach((text, j) => line.appendChild(span(text, j < weights.length ? weights[j] : 0)));
    box.appendChild(line);
  });
}
function draw() {
  document.querySelectorAll("#tokens .tok").forEach((s, i) => s.classList.toggle("active", i === active));
  drawHeads();
}
function drawLens() {
  const table = document.getElementById("lens");
  const head = table.insertRow();
  ["layer", ...data.lens[0].top.map((_, i) => `#${i + 1}`), "p(final choice)"].forEach(t => {
    const th = document.createElement("th"); th.textContent = t; head.appendChild(th);
  });
  data.lens.forEach(row => {
    const tr = table.insertRow();
    tr.insertCell().textContent = row.layer;
    row.top.forEach(([text, p]) => {
      const td = tr.insertCell();
      td.textContent = `${JSON.stringify(text)} ${p.toFixed(2)}`;
      td.style.background = `rgba(37,99,235,${(p * 0.8).toFixed(3)})`;
    });
    tr.insertCell().textContent = row.final.toFixed(3);
  });
}
layerSelect.addEventListener("change", draw);
drawTokens();
draw();
drawLens();
</script></body></html>
"""


def explain_page(
    title: str,
    labels: list[str],
    maps: torch.Tensor,
    lens_rows: list[dict],
    tokenizer: Tokenizer,
    attributions: torch.Tensor,
    prediction: str,
    attribution_note: str,
) -> str:
    """One self-contained HTML page (no external scripts or fonts): attention explorer, logit lens, attributions."""
    data = {
        "tokens": labels,
        "prediction": prediction,
        "attention": [[[[round(w, 3) for w in row] for row in head] for head in layer] for layer in maps.tolist()],
        "lens": [
            {
                "layer": row["layer"],
                "top": [[tokenizer.decode([t]), round(p, 4)] for t, p in zip(row["top_ids"], row["top_probabilities"])],
                "final": round(row["final_choice_probability"], 4),
            }
            for row in lens_rows
        ],
    }
    # "</" inside the JSON would end the <script> element early; "<\/" is the same string to JavaScript.
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return (
        PAGE.replace("__TITLE__", html.escape(title))
        .replace("__ATTRIBUTION_NOTE__", html.escape(attribution_note))
        .replace("__ATTRIBUTIONS__", _attribution_spans(labels, attributions))
        .replace("__DATA__", payload)
    )


def explain(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    out: str | Path,
    top_k: int = 5,
    method: str = "integrated_gradients",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Attention PNGs (one per layer), logit_lens.png, explain.html and explain.json for `prompt`'s next token.

    `progress(stage, done, total)` follows the slow stages (the attribution passes, the PNGs)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise LmforgeError("the prompt encodes to no tokens; give some text to explain")
    if len(ids) > MAX_HTML_TOKENS:
        raise LmforgeError(f"the prompt has {len(ids)} tokens; explain takes at most {MAX_HTML_TOKENS}")
    if not 1 <= top_k <= model.config.vocab_size:
        raise LmforgeError(f"top_k={top_k}: the logit lens shows between 1 and {model.config.vocab_size} tokens")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = torch.tensor(ids, device=model.token_embedding.weight.device)
    model.eval()
    labels = token_strings(tokenizer, ids)
    maps = attention_maps(model, tokens)
    lens_rows = logit_lens(model, tokens, top_k)
    stage = (lambda name: functools.partial(progress, name)) if progress else (lambda name: None)
    scores, target = next_token_attributions(model, tokens, method=method, progress=stage(f"{method} passes"))
    scores = scores.cpu()
    prediction = tokenizer.decode([target])
    attention_pngs = save_attention_pngs(maps, labels, out / "attention", stage("attention PNGs, one per layer"))
    lens_png = save_logit_lens_png(
        lens_rows, tokenizer, out / "logit_lens.png", f"logit lens: {prompt!r} → {prediction!r}"
    )
    note = f"{method.replace('_', ' ')} of the logit of {prediction!r} with respect to each input token's embedding."
    page = out / "explain.html"
    page.write_text(
        explain_page(prompt, labels, maps, lens_rows, tokenizer, scores, prediction, note), encoding="utf-8"
    )
    summary = {
        "prompt": prompt,
        "tokens": labels,
        "prediction": prediction,
        "prediction_id": target,
        "attributions": {"method": method, "scores": scores.tolist()},
        "logit_lens": [{**row, "top_tokens": [tokenizer.decode([t]) for t in row["top_ids"]]} for row in lens_rows],
        "files": {
            "html": str(page),
            "logit_lens_png": str(lens_png),
            "attention_pngs": [str(p) for p in attention_pngs],
        },
    }
    (out / "explain.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary["terminal"] = attributions_terminal(labels, scores)
    summary["plain"] = attributions_plain(labels, scores)
    return summary


CLASSIFIER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge explain: __TITLE__</title>
<style>
body { font: 14px/1.6 system-ui, sans-serif; margin: 24px; max-width: 900px; }
.tok { white-space: pre; padding: 2px 1px; border-radius: 3px; font-family: ui-monospace, monospace; }
td, th { border: 1px solid #ddd; padding: 3px 8px; } table { border-collapse: collapse; }
</style></head><body>
<h1>__TITLE__</h1>
<table><tr><th>class</th><th>probability</th></tr>__ROWS__</table>
<p>Integrated gradients of the <b>__LABEL__</b> logit for each token; green pushes towards it, red away.</p>
<div>__SPANS__</div>
</body></html>
"""


def explain_classification(classifier, text: str, out: str | Path) -> dict:
    """Why a saved `TextClassifier` labels `text` as it does: explain.html and explain.json in `out`."""
    from lmforge.finetune.classify import tokenize_texts

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens, _ = tokenize_texts(classifier.tokenizer, [text], classifier.max_tokens)
    tokens = tokens[0]
    probabilities = classifier.probabilities([text])[0]
    label = int(probabilities.argmax())
    scores = classifier_attributions(classifier.model, tokens, label)
    ids = tokens.tolist()
    decode = getattr(classifier.tokenizer, "id_to_token", None)
    labels = [decode(i) for i in ids] if decode else [classifier.tokenizer.decode([i]) for i in ids]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{p:.4f}</td></tr>"
        for name, p in zip(classifier.label_names, probabilities.tolist())
    )
    page = out / "explain.html"
    page.write_text(
        CLASSIFIER_PAGE.replace("__TITLE__", html.escape(text[:80]))
        .replace("__ROWS__", rows)
        .replace("__LABEL__", html.escape(classifier.label_names[label]))
        .replace("__SPANS__", _attribution_spans([f"{t} " for t in labels], scores)),
        encoding="utf-8",
    )
    summary = {
        "text": text,
        "label": classifier.label_names[label],
        "probabilities": dict(zip(classifier.label_names, probabilities.tolist())),
        "tokens": labels,
        "attributions": scores.tolist(),
        "files": {"html": str(page)},
    }
    (out / "explain.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary["terminal"] = attributions_terminal([f"{t} " for t in labels], scores)
    summary["plain"] = attributions_plain(labels, scores)
    return summary


# --- images: where a vision-language model's answer looks -----------------------------------


@torch.no_grad()
def image_attention(
    model: Transformer, tokens: torch.Tensor, embeddings: torch.Tensor, queries: list[int], image_positions: list[int]
) -> torch.Tensor:
    """(queries, image tokens): the attention each query position of one sequence pays each image token,
    averaged over every layer and head. `embeddings` (1, T, d_model) are the sequence's input (image features at
    the image tokens), `tokens` (T,) its ids."""
    with recording_attention(model) as records:
        model.hidden_states(tokens[None], embeddings=embeddings)
    maps = torch.stack([record[-1][0] for record in records]).float()  # (layers, heads, T, T)
    return maps.mean((0, 1))[queries][:, image_positions].cpu()


def save_image_attention_png(image, grids: torch.Tensor, titles: list[str], path: str | Path) -> Path:
    """`image` (a Pillow image, drawn grey) under each of `grids` (N, rows, columns) as a heatmap stretched over
    it, one panel per grid, titled by `titles`; each grid's colours span its own range."""
    import numpy as np

    plt = _matplotlib()
    count = len(grids)
    columns = min(count, 4)
    rows = -(-count // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.0 * columns, 3.3 * rows), squeeze=False, layout="constrained"
    )  # constrained: tight_layout let a row's titles run over the row above
    pixels = np.asarray(image.convert("L"))  # grey, so that the heatmap's colours read as attention alone
    height, width = pixels.shape[:2]
    for index in range(rows * columns):
        axis = axes[index // columns][index % columns]
        axis.axis("off")
        if index >= count:
            continue
        axis.imshow(pixels, cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0), interpolation="nearest")
        axis.imshow(grids[index].numpy(), cmap="inferno", alpha=0.6, extent=(0, width, height, 0))
        axis.set_title(titles[index], fontsize=8)
    title = "attention from the answer's tokens to the image's patches (mean of all layers and heads)"
    figure.suptitle(title, fontsize=9)
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def explain_image(
    model,
    tokenizer: Tokenizer,
    image,
    prompt: str,
    out: str | Path,
    max_new_tokens: int = 24,
) -> dict:
    """Where a vision-language model (`lmforge.apps.vlm.VisionLanguageModel`) looks while it answers `prompt`
    about `image` (a Pillow image): its greedy answer, then for each answer token the attention from the
    position that chose it to each image token, averaged over every layer and head. Writes
    OUT/image_attention.png (the image under a heatmap of its patches: the whole answer, then token by token)
    and OUT/explain.json."""
    from lmforge.apps.vlm import vision_prompt_ids
    from lmforge.inference.generate import SamplingConfig, generate_tokens
    from lmforge.tokenizer import stop_token_ids

    language_model = model.language_model
    # an image's tokens (`VisionLanguageModel`): the class token, the patches row by row, then any others (the
    # count tokens, one per kind of object), which have no place in the image
    side = model.config.image_size // model.config.patch_size
    patch_tokens = slice(1, 1 + side * side)
    if model.tokens_per_image < 1 + side * side:
        raise LmforgeError(f"{model.tokens_per_image} image tokens hold no class token and {side}x{side} patches")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    ids, _ = vision_prompt_ids(model, tokenizer, messages)
    device = model.patch_positions.device
    pixels = model.preprocess_image(image)[None].to(device)
    model.eval()
    with torch.no_grad():
        prompt_embeddings = model.input_embeddings(torch.tensor([ids], device=device), pixels)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    stops = set(stop_token_ids(tokenizer))
    answer = []
    generated = generate_tokens(language_model, ids, sampling, tokenizer=tokenizer, prompt_embeddings=prompt_embeddings)
    for token in generated:
        if token in stops:
            break
        answer.append(token)
    if not answer:
        raise LmforgeError(f"the model answered {prompt!r} with nothing (an end-of-turn at once): no tokens to explain")
    tokens = torch.tensor(ids + answer, device=device)
    with torch.no_grad():
        embeddings = model.input_embeddings(tokens[None], pixels)
    # The position before each answer token is where it was chosen (its logits came from there).
    queries = [len(ids) - 1 + index for index in range(len(answer))]
    image_positions = [position for position, token in enumerate(ids) if token == model.image_token_id]
    weights = image_attention(language_model, tokens, embeddings, queries, image_positions)  # (answer, image)
    patches = weights[:, patch_tokens].reshape(len(answer), side, side)
    labels = token_strings(tokenizer, answer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shown = 11  # panels after the whole answer's
    grids = torch.cat([patches.mean(0, keepdim=True), patches[:shown]])
    titles = [f"the answer: {tokenizer.decode(answer)[:28]!r}"]
    titles += [f"{label!r}: {float(share):.0%} on the image" for label, share in zip(labels, weights.sum(1))]
    png = save_image_attention_png(image, grids, titles[: len(grids)], out / "image_attention.png")
    summary = {
        "prompt": prompt,
        "answer": tokenizer.decode(answer),
        "answer_tokens": labels,
        "answer_ids": answer,
        "image_tokens": {
            "positions": image_positions,
            "class_token": 0,
            "patch_tokens": [patch_tokens.start, patch_tokens.stop],
            "patch_grid": [side, side],
        },
        # per answer token: the attention (mean of layers and heads) its choosing position paid the image
        "image_attention_share": weights.sum(1).tolist(),
        "class_token_attention": weights[:, 0].tolist(),
        "patch_attention": patches.tolist(),
        "other_image_token_attention": weights[:, patch_tokens.stop :].tolist(),  # count tokens, if any
        "files": {"png": str(png)},
    }
    (out / "explain.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
