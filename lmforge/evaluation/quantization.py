"""How much quantisation changes a model: the perplexity of both models and the mean KL divergence
of their next-token distributions on held-out text (llama.cpp's check), and the `lmforge quantize`
workflow that quantises, saves and scores a model in one call."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.formats.checkpoint import save_model
from lmforge.formats.loading import load
from lmforge.inference.quantize import default_group_size, quantize_model, weight_bytes
from lmforge.model import Transformer


def kl_divergence_report(
    reference: Transformer,
    quantized: Transformer,
    tokens: torch.Tensor,
    window: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """llama.cpp's quality check: perplexity of both models and the mean KL(reference || quantized)
    of their next-token distributions over `tokens` (1-D), scored in windows; `progress(done, total)`
    after each window (~15 s each for SmolLM2 on a busy 2-core CPU)."""
    window = min(window, reference.config.block_size)
    starts = range(0, tokens.numel() - 1, window)
    total_kl, nll_reference, nll_quantized, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for done, start in enumerate(starts, 1):
            chunk = tokens[start : start + window + 1]
            if chunk.numel() < 2:
                break
            inputs, targets = chunk[:-1][None], chunk[1:]
            log_p = F.log_softmax(reference(inputs)[0][0].float(), dim=-1)
            log_q = F.log_softmax(quantized(inputs)[0][0].float(), dim=-1)
            total_kl += (log_p.exp() * (log_p - log_q)).sum().item()
            nll_reference -= log_p.gather(-1, targets[:, None]).sum().item()
            nll_quantized -= log_q.gather(-1, targets[:, None]).sum().item()
            count += targets.numel()
            if progress:
                progress(done, len(starts))
    return {
        "tokens": count,
        "perplexity_reference": math.exp(nll_reference / count),
        "perplexity_quantized": math.exp(nll_quantized / count),
        "mean_kl": total_kl / count,
    }


def leading_tokens(tokenizer, text: str, count: int) -> list[int]:
    """The first `count` tokens of `text`, encoding only as much of it as they need: a whole book
    takes minutes (107 KB of Shakespeare: 9 s with SmolLM2's tokenizer on a busy 2-core CPU)."""
    chars = 8 * count  # most tokens are shorter; grown until the prefix holds enough
    while True:
        ids = tokenizer.encode(text[:chars])
        # a margin past `count`: cutting the text changes only the tokens of its last word
        if len(ids) >= count + 16 or chars >= len(text):
            return ids[:count]
        chars *= 2


KL_WARNING = 0.1  # mean KL (nats/token) above which answers visibly change; llama.cpp's Q4_0 on 7B models is ~0.03


def quantize_and_save(
    source: str,
    out: str,
    bits: int,
    group_size: int | None = None,
    eval_text: str | None = None,
    eval_tokens: int = 2048,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Quantise a model (a name, .gguf, HF folder or checkpoint), save it as a checkpoint folder
    that `lmforge.load` reads directly, and report its quality against the fp32 original on
    `eval_text` (default: held-out Shakespeare) as perplexities and mean KL divergence.
    `progress(stage, done, total)` follows the two slow stages: quantising and scoring."""
    if group_size is not None and (group_size <= 0 or group_size % 32):
        raise LmforgeError(f"group size {group_size} must be a positive multiple of 32 (GGUF's block size)")
    if eval_tokens < 2:
        raise LmforgeError(f"eval_tokens={eval_tokens}: scoring needs at least 2 tokens")
    stage = (lambda name: functools.partial(progress, name)) if progress else (lambda name: None)
    reference, tokenizer = load(source, keep_quantized=False)
    if eval_text is None:
        from lmforge.training.recipes import shakespeare_corpus

        text = shakespeare_corpus().read_text(encoding="utf-8")
        eval_text = text[len(text) * 9 // 10 :]  # the tail: text quantisation did not look at
    tokens = torch.tensor(leading_tokens(tokenizer, eval_text, eval_tokens))
    if tokens.numel() < 2:  # checked before anything is written
        raise LmforgeError(
            f"the evaluation text is {tokens.numel()} token(s) long; scoring needs at least 2: give a longer text"
        )
    quantized = quantize_model(copy.deepcopy(reference), bits, group_size, progress=stage("quantising layers"))
    save_model(out, quantized, tokenizer, {"quantized_from": str(source)})
    report = kl_divergence_report(
        reference, quantized, tokens, progress=stage(f"scoring both models on {tokens.numel()} tokens")
    )
    report.update(
        bits=bits,
        group_size=group_size or default_group_size(reference.config.d_model, bits),
        fp32_megabytes=weight_bytes(reference) / 1e6,
        quantized_megabytes=weight_bytes(quantized) / 1e6,
        warning=report["mean_kl"] > KL_WARNING,
    )
    return report
