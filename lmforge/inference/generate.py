"""Sampling from a model: temperature, top-k, top-p, repetition penalty, stop strings, streaming.

`generate_tokens` yields token ids using the KV cache; `generate` wraps it to stream text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.inference.constrained import TokenMasks, matchers_for
from lmforge.inference.engine import compiled_decode_step, next_token_logits, prefill, use_prefill_threads
from lmforge.model import KVCache, Transformer
from lmforge.settings import SamplingConfig
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer import stop_token_ids as model_stop_ids


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): divide positive logits of seen tokens by penalty, multiply negative ones."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


TOP_P_CANDIDATES = 256  # where the nucleus is looked for first: a partial sort, not the whole vocabulary's


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits (B, vocab) with every token outside the nucleus at -inf: a token is dropped once the more
    likely tokens before it already cover `top_p` (the first always stays). The nucleus is found among
    the TOP_P_CANDIDATES likeliest tokens when they cover `top_p`, as they nearly always do: sorting
    SmolLM2's 49k logits took 2-4 ms a token, a third of a decoding step; the 256 likeliest take 0.13 ms.
    Tokens past the candidates would be dropped by the full sort too, their mass before them >= top_p."""
    probabilities = logits.softmax(dim=-1)
    candidates = min(TOP_P_CANDIDATES, logits.shape[-1])
    top, order = probabilities.topk(candidates, dim=-1)  # sorted, likeliest first
    cumulative = top.cumsum(dim=-1)
    if not bool((cumulative[..., -1] >= top_p).all()):  # a flat distribution: sort everything
        top, order = probabilities.sort(dim=-1, descending=True)
        cumulative = top.cumsum(dim=-1)
    keep_sorted = cumulative - top < top_p
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def pick_next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        logits = keep_top_p(logits, sampling.top_p)
    probabilities = logits.softmax(dim=-1)
    # Inverse-CDF sampling: one cumulative sum and a binary search. torch.multinomial took ~5 ms
    # per row over a 49k vocabulary here, more than a decoding step of the model it samples for.
    cumulative = probabilities.cumsum(dim=-1)
    threshold = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device) * cumulative[:, -1:]
    picked = torch.searchsorted(cumulative, threshold, right=True).squeeze(-1)
    return picked.clamp(max=logits.shape[-1] - 1)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """`logits` (..., vocab) with `bias[token]` added to each biased token's logit (OpenAI's logit_bias)."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), device=logits.device)
    logits = logits.clone()
    logits[..., ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def check_logit_bias(bias: dict[int, float], vocab_size: int) -> None:
    """Refuse a bias on a token id the model does not have (it would index past the logits)."""
    outside = sorted(token for token in bias if token >= vocab_size)
    if outside:
        raise LmforgeError(f"logit_bias names token id {outside[0]}, outside the vocabulary of {vocab_size} tokens")


@dataclass
class TokenScore:
    """A token's log-probability under the model, and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def score_tokens(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenScore]:
    """Scores of the `chosen` tokens (N,) under logits (N, vocab): their log-softmax and the `top` best."""
    log_probabilities = F.log_softmax(logits.float(), dim=-1)
    picked = log_probabilities.gather(-1, chosen[:, None])[:, 0].tolist()
    best_values, best_ids = log_probabilities.topk(top, dim=-1) if top else (log_probabilities[:, :0],) * 2
    return [
        TokenScore(token, logprob, list(zip(ids, values)))
        for token, logprob, ids, values in zip(chosen.tolist(), picked, best_ids.tolist(), best_values.tolist())
    ]


PROMPT_SCORE_CHUNK = 256  # prompt positions per LM-head pass: (chunk, vocab) logits, not (prompt, vocab)


@torch.inference_mode()
def score_prompt(model: Transformer, prompt_ids: list[int], top: int, bias: dict[int, float]) -> list[TokenScore]:
    """Each prompt token's score given the tokens before it (so none for the first): what a completion's
    `echo` with `logprobs` reports. One pass of the model over the prompt, with no cache."""
    use_prefill_threads(model)
    if len(prompt_ids) < 2:
        return []
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    hidden = model.hidden_states(ids[:, :-1], None)[0]
    scores = []
    for start in range(0, hidden.shape[0], PROMPT_SCORE_CHUNK):
        logits = apply_logit_bias(model.logits(hidden[start : start + PROMPT_SCORE_CHUNK]).float(), bias)
        scores += score_tokens(logits, ids[0, start + 1 : start + 1 + PROMPT_SCORE_CHUNK], top)
    return scores


def _adjust_logits(logits: torch.Tensor, history: list[list[int]], sampling: SamplingConfig) -> torch.Tensor:
    logits = apply_logit_bias(logits, sampling.logit_bias)
    if sampling.repetition_penalty == 1.0:
        return logits
    rows = [apply_repetition_penalty(logits[i : i + 1], torch.tensor([sorted(set(seen))]), sampling.repetition_penalty)
            for i, seen in enumerate(history)]  # fmt: skip
    return torch.cat(rows)


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    use_cache: bool = True,
    compile: bool = False,
    tokenizer: Tokenizer | None = None,
    prompt_embeddings: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch of one), stopping after max_new_tokens.

    With the cache, the prompt is prefilled in one pass and each step feeds only the new token.
    Once the context fills the model's block, both paths recompute over the last block_size
    tokens, so they agree exactly. compile=True decodes with `torch.compile` of a static-shape
    step (`engine.compiled_decode_step`; the first call compiles, tens of seconds) instead of
    the native kernels, falling back to them where compilation is unavailable. With a json_schema or
    grammar in `sampling` (which needs `tokenizer`), each token is one the grammar allows, and the tokens
    end once the output is complete. `prompt_embeddings` (1, len(prompt_ids), d_model) are the prompt's
    input in place of its tokens' embeddings (image features among them, `lmforge.apps.vlm`): the prefill
    runs on them, the decoding steps after it on the new tokens as usual; since they cannot be recomputed
    from the tokens, generation ends where the context would fill the block instead of sliding on.
    """
    if prompt_embeddings is not None and prompt_embeddings.shape[1] != len(prompt_ids):
        raise ValueError(f"{prompt_embeddings.shape[1]} prompt embeddings for {len(prompt_ids)} prompt tokens")
    matcher = (matchers_for(sampling, tokenizer, 1) or [None])[0]
    device = next(model.parameters()).device
    masks = TokenMasks(device)
    block_size = model.config.block_size
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens = list(prompt_ids)
    cache = None
    compiled = compiled_decode_step(model) if compile and use_cache else None
    if use_cache:
        # Sized to this request, not the model's whole context (8k positions for SmolLM2); a compiled
        # step sees the cache's shape, so round it up to few distinct sizes to reuse its graph.
        capacity = min(block_size, len(tokens) + sampling.max_new_tokens)
        if compiled is not None:
            capacity = min(block_size, max(256, 1 << (capacity - 1).bit_length()))
        cache = KVCache(
            model.config, 1, capacity, device=device, dtype=next(model.parameters()).dtype, static=compiled is not None
        )
    pending = tokens[-block_size:]  # what the model has not seen yet
    embeddings = prompt_embeddings  # the prompt's input while it is pending (None: the tokens' own)
    if embeddings is not None and len(tokens) > block_size:
        raise ValueError(f"prompt of {len(tokens)} tokens with embeddings exceeds block_size={block_size}")
    for _ in range(sampling.max_new_tokens):
        if embeddings is not None and not use_cache and len(tokens) > block_size:
            return
        if cache is not None and cache.length + len(pending) > cache.max_length:
            if prompt_embeddings is not None:
                return
            cache.reset()
            pending = tokens[-block_size:]
        inputs = torch.tensor([pending if cache is not None else tokens[-block_size:]], device=device)
        masks.start([matcher])
        if compiled is not None and len(pending) == 1:
            position = torch.tensor([cache.length], device=device)
            logits = compiled(model, inputs, position, cache)
            cache.length += 1
        elif embeddings is not None and cache is None:  # no cache: the whole sequence every step
            new_tokens = torch.tensor([tokens[len(prompt_ids) :]], dtype=torch.long, device=device)
            x = torch.cat([embeddings, model.embed(new_tokens)], dim=1)
            logits = next_token_logits(model, inputs, None, embeddings=x)
        else:
            logits = next_token_logits(model, inputs, cache, embeddings=embeddings)
            embeddings = None
        logits = masks.apply(_adjust_logits(logits, [tokens], sampling))
        token = int(pick_next_token(logits, sampling, generator)[0])
        tokens.append(token)
        pending = [token]
        if matcher is not None:
            matcher.consume(token)
        yield token
        if matcher is not None and matcher.complete:
            return


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    stop_token_ids: set[int] | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[list[int]]:
    """New token ids for several prompts of different lengths, decoded together.

    Each row keeps its own positions in a shared cache (no left padding, so results match
    one-at-a-time generation); a row that emits a stop token leaves the batch, and the next
    steps run on the remaining rows only. With a seed, row i samples from generator seed + i. With a
    json_schema or grammar in `sampling` (which needs `tokenizer`), each row follows it and leaves the batch
    once its output is complete.
    """
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("generate_batch needs at least one prompt, and no empty prompt")
    device = next(model.parameters()).device
    lengths = [len(prompt) for prompt in prompts]
    capacity = max(lengths) + sampling.max_new_tokens
    if capacity > model.config.block_size:
        raise ValueError(
            f"longest prompt ({max(lengths)} tokens) + max_new_tokens ({sampling.max_new_tokens}) "
            f"exceeds the model's context of {model.config.block_size}"
        )
    generators = [None] * len(prompts)
    if sampling.seed is not None:
        generators = [torch.Generator(device=device).manual_seed(sampling.seed + i) for i in range(len(prompts))]
    matchers = matchers_for(sampling, tokenizer, len(prompts))
    masks = TokenMasks(device)
    cache = KVCache(model.config, len(prompts), capacity, device=device, dtype=next(model.parameters()).dtype)
    if matchers is not None:
        masks.start(matchers)
    logits = prefill(model, prompts, cache)
    histories = [list(prompt) for prompt in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    stop_ids = stop_token_ids or set()
    for step in range(sampling.max_new_tokens):
        logits = masks.apply(_adjust_logits(logits, [histories[row] for row in active], sampling))
        if generators[0] is None:
            picked = pick_next_token(logits, sampling, None).tolist()
        else:
            picked = [
                int(pick_next_token(logits[i : i + 1], sampling, generators[row])[0]) for i, row in enumerate(active)
            ]
        still_active = []
        for token, row in zip(picked, active):
            histories[row].append(token)
            outputs[row].append(token)
            complete = False
            if matchers is not None:
                matchers[row].consume(token)
                complete = matchers[row].complete
            if token not in stop_ids and not complete:
                still_active.append(row)
        active = still_active
        if not active or step == sampling.max_new_tokens - 1:
            break
        if matchers is not None:
            masks.start([matchers[row] for row in active])
        slots = torch.tensor(active, device=device)
        inputs = torch.tensor([[histories[row][-1]] for row in active], device=device)
        positions = torch.tensor([len(histories[row]) - 1 for row in active], device=device)
        logits = next_token_logits(model, inputs, cache, positions=positions, slots=slots)
    return outputs


class TextStream:
    """Generated token ids → text pieces to show, honouring stop strings.

    Text that could still become a stop string, and an incomplete UTF-8 character at the
    end, is held back until it is decided.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show. Sets `stopped` at a stop string."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        emitted = self.emitted
        found = (text.find(s, max(emitted - len(s), 0)) for s in self.stop)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.emitted = max(cut, emitted)
            return text[emitted:cut] if cut > emitted else ""
        safe = len(text)
        while safe > emitted and text[safe - 1] == "\ufffd":
            safe -= 1  # a multi-byte character may still be arriving
        for stop in self.stop:
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - size : safe] == stop[:size]:
                    safe -= size
                    break
        if safe <= emitted:
            return ""
        self.emitted = safe
        return text[emitted:safe]

    def flush(self) -> str:
        """What was held back, once generation has ended without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens)
        rest, self.emitted = text[self.emitted :], len(text)
        return rest


def check_greedy_for_draft(sampling: SamplingConfig) -> None:
    """Speculative decoding keeps the target's argmax: refuse settings it would silently ignore."""
    offending = []
    if sampling.temperature != 0:
        offending.append(f"temperature must be 0 (not {sampling.temperature:g})")
    if sampling.repetition_penalty != 1.0:
        offending.append(f"repetition_penalty must be 1 (not {sampling.repetition_penalty:g})")
    if sampling.constrained:
        offending.append("json_schema and grammar are not supported")
    if sampling.logit_bias:
        offending.append("logit_bias must be empty")
    if offending:
        raise LmforgeError("speculative decoding with a draft model is greedy: " + " and ".join(offending))


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    sampling: SamplingConfig | None = None,
    stop_at_eos: bool = True,
    stop_token_ids: set[int] | None = None,
    draft: Transformer | None = None,
    draft_tokens: int = 4,
    prompt_embeddings: torch.Tensor | None = None,
) -> Iterator[str]:
    """Stream the completion of `prompt` (plain text, or token ids such as `encode_chat` gives) as
    text pieces, honouring stop strings and end-of-text (and any of `stop_token_ids`). With a `draft`
    model (same tokenizer), decoding is speculative (`lmforge.inference.speculative`): greedy only, the same
    text, faster when the draft is much cheaper. `prompt_embeddings`: the prompt ids' input embeddings
    (with image features, `lmforge.apps.vlm.generate_with_images`), as `generate_tokens` takes them."""
    sampling = sampling or SamplingConfig()
    check_logit_bias(sampling.logit_bias, model.config.vocab_size)
    if draft is not None:
        check_greedy_for_draft(sampling)
        if prompt_embeddings is not None:
            raise LmforgeError("speculative decoding does not take prompt embeddings (images)")
    prompt_ids = tokenizer.with_document_marks(tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
    if not prompt_ids and tokenizer.bos_id is not None:
        prompt_ids = [tokenizer.bos_id]
    stop_ids = set(stop_token_ids or ())
    if stop_at_eos and tokenizer.eos_id is not None:
        stop_ids.add(tokenizer.eos_id)
    if sampling.constrained:
        stop_ids |= model_stop_ids(tokenizer)  # where the grammar may end, it lets any of them end the text
    stream = TextStream(tokenizer, sampling.stop)
    if draft is None:
        with_embeddings = {} if prompt_embeddings is None else {"prompt_embeddings": prompt_embeddings}
        tokens = generate_tokens(model, prompt_ids, sampling, tokenizer=tokenizer, **with_embeddings)
    else:
        from lmforge.inference.speculative import speculative_generate

        tokens = speculative_generate(model, draft, prompt_ids, sampling.max_new_tokens, draft_tokens)
    for token in tokens:
        if token in stop_ids:
            break
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    rest = stream.flush()
    if rest:
        yield rest
