"""Language-model evaluation: perplexity and bits-per-byte, multiple-choice and generative tasks, reports.

- `evaluate_loss`: over a prepared token dataset, batch by batch.
- `text_perplexity`: over any text, with a sliding window when it is longer than the context.
- `score_multiple_choice`: log-likelihood of each choice (sum and length-normalised), the method
  behind HellaSwag/ARC/MMLU-style benchmarks; `score_generation`: greedy answers, exact match.
- `run_task` reads a JSONL task file (`context` + `choices` + `label`, or `context` + `answer`),
  with few-shot prompting; `write_report` / `compare_reports` write Markdown and HTML.
"""

from __future__ import annotations

import html
import json
import math
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.training.data import TokenDataset, read_records


@torch.no_grad()
def evaluate_loss(
    model: Transformer,
    dataset: TokenDataset,
    token_byte_lengths: np.ndarray | None = None,
    block_size: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    autocast=None,
) -> dict:
    """Mean next-token loss (nats), perplexity and bits-per-byte over the dataset, in order.

    Streams batches so only one batch of logits is ever held. Bits-per-byte divides the
    total loss in bits by the UTF-8 bytes of the predicted tokens, so it compares across
    tokenizers.
    """
    was_training = model.training
    model.eval()
    block_size = block_size or model.config.block_size
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    byte_lengths = torch.from_numpy(token_byte_lengths) if token_byte_lengths is not None else None
    for inputs, targets in dataset.iterate(block_size, batch_size, max_tokens):
        inputs = inputs.to(_device(model))
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            logits, _ = model(inputs)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.to(logits.device).flatten(), reduction="sum")
        total_nats += losses.item()
        total_tokens += targets.numel()
        if byte_lengths is not None:
            total_bytes += int(byte_lengths[targets].sum())
    model.train(was_training)
    loss = total_nats / total_tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens}
    if byte_lengths is not None and total_bytes:
        result["bits_per_byte"] = total_nats / math.log(2) / total_bytes
    return result


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_log_probabilities(
    model: Transformer, tokens: list[int], window: int | None = None, stride: int | None = None
):
    """log p(token_i | tokens before it, within one window) for i = 1..len-1, as a (len - 1,) tensor.

    A sequence longer than the window is scored by windows `stride` tokens apart; each token is
    scored once, in the window that gives it the most context (HF's strided perplexity). Only
    one window of logits exists at a time.
    """
    window = min(window or model.config.block_size, model.config.block_size)
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise LmforgeError(f"stride must be in 1..{window}, got {stride}")
    ids = torch.tensor(tokens, dtype=torch.long, device=_device(model))
    scored = torch.empty(len(tokens) - 1, dtype=torch.float32)
    done = 1  # tokens[0] has no context and is never scored
    begin = 0
    while done < len(tokens):
        end = min(begin + window, len(tokens))
        logits, _ = model(ids[None, begin:end])
        log_probabilities = F.log_softmax(logits[0].float(), -1)
        # Position p of the window predicts token begin + p + 1; keep the ones not scored yet.
        first = done - begin - 1
        targets = ids[done:end]
        scored[done - 1 : end - 1] = log_probabilities[first : end - begin - 1].gather(-1, targets[:, None])[:, 0].cpu()
        done = end
        # The next window starts `stride` later, but never past the last scored token (it is the next context).
        begin = min(begin + stride, done - 1, max(len(tokens) - window, 0))
    return scored


def text_perplexity(
    model: Transformer, tokenizer: Tokenizer, text: str, window: int | None = None, stride: int | None = None
) -> dict:
    """Loss, perplexity and bits-per-byte of `text` (a document separator is put in front, so every token of
    the text is predicted). Bits-per-byte divides by the UTF-8 bytes of the text: comparable across tokenizers."""
    start = tokenizer.document_start_id
    tokens = ([start] if start is not None else []) + tokenizer.encode(text)
    if len(tokens) < 2:
        raise LmforgeError("the text is too short to score (needs at least 2 tokens)")
    was_training = model.training
    model.eval()
    log_probabilities = token_log_probabilities(model, tokens, window, stride)
    model.train(was_training)
    nats = -float(log_probabilities.sum())
    scored_bytes = len(text.encode("utf-8")) if start is not None else len(tokenizer.decode(tokens[1:]).encode())
    loss = nats / len(log_probabilities)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nats / math.log(2) / max(scored_bytes, 1),
        "tokens": len(log_probabilities),
        "bytes": scored_bytes,
    }


@dataclass
class Example:
    """One task item: a prompt, and either choices + the right one's index, or accepted answers."""

    context: str
    choices: list[str] | None = None
    label: int | None = None
    answers: list[str] | None = None


def read_task(path: str | Path) -> list[Example]:
    """A JSONL task: `{"context", "choices", "label"}` (multiple choice) or `{"context", "answer"}`
    (generative; `answer` may be a list of accepted answers). `question`/`prompt` work for `context`."""
    examples = []
    for line_number, record in read_records(path):
        context = next((record[k] for k in ("context", "question", "prompt") if k in record), None)
        if not isinstance(context, str):
            raise LmforgeError(f"{path}:{line_number}: needs a string 'context' (or 'question'/'prompt')")
        if "choices" in record:
            choices, label = record["choices"], record.get("label")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise LmforgeError(f"{path}:{line_number}: 'choices' must be a list of at least 2 strings")
            if not isinstance(label, int) or not 0 <= label < len(choices):
                raise LmforgeError(f"{path}:{line_number}: 'label' must be an index into the {len(choices)} choices")
            examples.append(Example(context, choices=choices, label=label))
        elif "answer" in record or "answers" in record:
            answers = record.get("answers", record.get("answer"))
            answers = [answers] if isinstance(answers, str) else answers
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise LmforgeError(f"{path}:{line_number}: 'answer' must be a string or a list of strings")
            examples.append(Example(context, answers=answers))
        else:
            raise LmforgeError(f"{path}:{line_number}: needs 'choices' + 'label' or 'answer'")
    if not examples:
        raise LmforgeError(f"{path}: no examples")
    kinds = {example.choices is None for example in examples}
    if len(kinds) > 1:
        raise LmforgeError(f"{path}: mixes multiple-choice and generative examples; use one kind per file")
    return examples


def fewshot_prefix(examples: list[Example], index: int, shots: int, seed: int) -> str:
    """`shots` other examples with their right answers, each followed by a blank line (seeded, never the same item)."""
    if shots == 0:
        return ""
    others = [i for i in range(len(examples)) if i != index]
    if shots > len(others):
        raise LmforgeError(f"{shots}-shot needs {shots + 1} examples; the task has {len(examples)}")
    picked = random.Random(seed * 100_003 + index).sample(others, shots)
    parts = []
    for i in picked:
        example = examples[i]
        answer = example.choices[example.label] if example.choices is not None else example.answers[0]
        parts.append(example.context + answer)
    return "\n\n".join(parts) + "\n\n"


def _split_context(context: str, continuation: str) -> tuple[str, str]:
    # As lm-evaluation-harness: trailing spaces of the context belong to the continuation, so
    # "Answer: " + "Paris" tokenizes like "Answer:" + " Paris".
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped) :] + continuation


def continuation_log_likelihood(
    model: Transformer, tokenizer: Tokenizer, context: str, continuation: str, special_tokens: bool = False
):
    """(sum of log p(continuation tokens | context), whether each was the greedy choice, token count).
    `special_tokens`: special-token strings in the text are those tokens (a chat-templated prompt's markup)."""
    encode = tokenizer.encode_with_special_tokens if special_tokens else tokenizer.encode
    context, continuation = _split_context(context, continuation)
    context_ids = encode(context)
    whole = encode(context + continuation)
    if whole[: len(context_ids)] != context_ids:  # the boundary merged into one token: encode apart
        whole = context_ids + encode(continuation)
    start = tokenizer.document_start_id
    if not context_ids and start is not None:
        whole, context_ids = [start] + whole, [start]
    continuation_count = len(whole) - len(context_ids)
    if continuation_count < 1:
        raise LmforgeError(f"continuation {continuation!r} encodes to no tokens")
    whole = whole[-(model.config.block_size + 1) :]  # keep the end: the continuation and as much context as fits
    ids = torch.tensor(whole, device=_device(model))
    logits, _ = model(ids[None, :-1])
    log_probabilities = F.log_softmax(logits[0, -continuation_count:].float(), -1)
    targets = ids[-continuation_count:]
    picked = log_probabilities.gather(-1, targets[:, None])[:, 0]
    greedy = bool((log_probabilities.argmax(-1) == targets).all())
    return float(picked.sum()), greedy, continuation_count


@torch.no_grad()
def score_multiple_choice(
    model: Transformer,
    tokenizer: Tokenizer,
    examples: list[Example],
    shots: int = 0,
    seed: int = 0,
    limit: int | None = None,
    progress=None,
) -> dict:
    """acc (argmax of summed log-likelihood) and acc_norm (of log-likelihood per byte of the choice,
    lm-evaluation-harness's length normalisation), over the first `limit` examples (few-shot
    examples may come from all of them)."""
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    predictions = []
    count = min(limit or len(examples), len(examples))
    for index, example in enumerate(examples[:count]):
        prompt = fewshot_prefix(examples, index, shots, seed) + example.context
        scores = [continuation_log_likelihood(model, tokenizer, prompt, choice)[0] for choice in example.choices]
        per_byte = [score / max(len(choice.encode("utf-8")), 1) for score, choice in zip(scores, example.choices)]
        choice, choice_norm = int(np.argmax(scores)), int(np.argmax(per_byte))
        correct += choice == example.label
        correct_norm += choice_norm == example.label
        predictions.append({"scores": scores, "prediction": choice, "prediction_norm": choice_norm})
        if progress:
            progress(index + 1, count)
    model.train(was_training)
    return {
        "acc": correct / count,
        "acc_norm": correct_norm / count,
        "examples": count,
        "predictions": predictions,
    }


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def score_generation(
    model: Transformer,
    tokenizer: Tokenizer,
    examples: list[Example],
    shots: int = 0,
    seed: int = 0,
    max_new_tokens: int = 32,
    until: tuple[str, ...] = ("\n",),
    limit: int | None = None,
    progress=None,
) -> dict:
    """Greedy answers cut at the first `until` string; exact_match (after strip) and normalised exact match."""
    from lmforge.inference.generate import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(until))
    exact = normalized = 0
    outputs = []
    count = min(limit or len(examples), len(examples))
    for index, example in enumerate(examples[:count]):
        prompt = fewshot_prefix(examples, index, shots, seed) + example.context
        answer = "".join(generate(model, tokenizer, prompt, sampling))
        for stop in until:
            answer = answer.split(stop)[0]
        exact += any(answer.strip() == expected.strip() for expected in example.answers)
        normalized += any(normalize_answer(answer) == normalize_answer(expected) for expected in example.answers)
        outputs.append(answer)
        if progress:
            progress(index + 1, count)
    return {
        "exact_match": exact / count,
        "exact_match_normalized": normalized / count,
        "examples": count,
        "outputs": outputs,
    }


def run_task(
    model: Transformer, tokenizer: Tokenizer, path: str | Path, shots: int = 0, limit: int | None = None, progress=None
) -> dict:
    """Score a JSONL task file; multiple-choice or generative is decided by its fields."""
    examples = read_task(path)
    if examples[0].choices is not None:
        result = score_multiple_choice(model, tokenizer, examples, shots, limit=limit, progress=progress)
    else:
        result = score_generation(model, tokenizer, examples, shots, limit=limit, progress=progress)
    return {"task": Path(path).stem, "shots": shots, **result}


# --- reports -----------------------------------------------------------------------------

HEADLINE_METRICS = ("loss", "perplexity", "bits_per_byte", "acc", "acc_norm", "exact_match", "exact_match_normalized")


def headline(result: dict) -> dict[str, float]:
    """`{section/metric: value}` for every headline metric of a result written by `lmforge eval`."""
    values = {}
    for section, metrics in result.get("metrics", {}).items():
        for name in HEADLINE_METRICS:
            if isinstance(metrics.get(name), (int, float)):
                values[f"{section}/{name}"] = float(metrics[name])
    return values


def write_report(result: dict, folder: str | Path) -> dict[str, Path]:
    """result.json, report.md and report.html (metrics table and a bar chart of the task accuracies) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = headline(result)
    paths = {"json": folder / "result.json", "markdown": folder / "report.md", "html": folder / "report.html"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in values.items())
    paths["markdown"].write_text(f"# Evaluation of {result['model']}\n\n| metric | value |\n| --- | --- |\n{rows}\n")
    chart = _accuracy_chart(values, folder / "accuracy.png")
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in values.items())
    image = f'<img src="{chart.name}" alt="accuracies">' if chart else ""
    paths["html"].write_text(
        f"<!doctype html><meta charset='utf-8'><title>lmforge eval</title>"
        f"<style>body{{font:14px system-ui;margin:24px}}td,th{{border:1px solid #ccc;padding:3px 8px}}"
        f"table{{border-collapse:collapse}}</style><h1>Evaluation of {html.escape(str(result['model']))}</h1>"
        f"<table><tr><th>metric</th><th>value</th></tr>{table}</table>{image}\n"
    )
    if chart:
        paths["chart"] = chart
    return paths


def _accuracy_chart(values: dict[str, float], path: Path) -> Path | None:
    accuracies = {k: v for k, v in values.items() if k.rsplit("/", 1)[-1] in ("acc", "acc_norm", "exact_match")}
    if not accuracies:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(4, 0.9 * len(accuracies) + 2), 3.2))
    axis.bar(range(len(accuracies)), list(accuracies.values()), color="#2563eb")
    axis.set_xticks(range(len(accuracies)), list(accuracies), rotation=30, ha="right", fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def compare_reports(paths: list[str | Path]) -> str:
    """A Markdown table: one column per result.json (or folder holding one), one row per metric."""
    results, labels = [], []
    for path in paths:
        path = Path(path)
        path = path / "result.json" if path.is_dir() else path
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise LmforgeError(f"{path}: not an lmforge eval result ({error})") from None
        # The model alone can repeat (one model, two settings): name the column by its result too.
        where = path.parent.name if path.name == "result.json" else path.stem
        labels.append(f"{results[-1]['model']} ({where})")
    tables = [headline(result) for result in results]
    names = sorted({name for table in tables for name in table})
    header = "| metric | " + " | ".join(labels) + " |"
    lines = [header, "| --- |" + " --- |" * len(results)]
    for name in names:
        cells = [f"{table[name]:.4f}" if name in table else "-" for table in tables]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
