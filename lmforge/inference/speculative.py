"""Speculative decoding: a small or quantised draft model proposes a few tokens, the target model
checks them all in one forward pass, and the tokens it agrees with are kept.

On a CPU, decoding is bound by how fast the weights stream from memory; checking k proposals
reads the target's weights once instead of k times. Greedy decoding only: the output is exactly
the target's own greedy output (a proposal is kept only where it equals the target's argmax),
whatever the draft. A good draft for an fp32 model is its own int4 copy (same tokenizer; SmolLM2's
Q4_1 weights get ~93% of their proposals accepted); `lmforge generate --draft`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.inference import engine
from lmforge.inference.engine import next_token_logits
from lmforge.model import KVCache, Transformer


@dataclass
class SpeculationStats:
    """Counts for one generation: rounds run, tokens proposed, proposals accepted."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@torch.inference_mode()
def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft_tokens: int = 4,
    stats: SpeculationStats | None = None,
) -> Iterator[int]:
    """Yield the target's greedy continuation of `prompt_ids`, one token at a time (as
    `generate_tokens` with temperature 0 would), using `draft` to propose `draft_tokens` at a time."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise LmforgeError(
            f"draft and target vocabularies differ ({draft.config.vocab_size} vs {target.config.vocab_size}); "
            "the draft must share the target's tokenizer"
        )
    if not prompt_ids:
        raise LmforgeError("speculative decoding needs a prompt of at least one token")
    if draft_tokens < 1:
        raise LmforgeError(f"draft_tokens must be at least 1, not {draft_tokens}")
    capacity = len(prompt_ids) + max_new_tokens + draft_tokens + 1
    if capacity > min(target.config.block_size, draft.config.block_size):
        raise LmforgeError(f"prompt + max_new_tokens + draft tokens ({capacity}) exceed a model's block size")
    stats = stats if stats is not None else SpeculationStats()
    if max_new_tokens <= 0:
        return
    target_cache = KVCache(target.config, 1, capacity, dtype=next(target.parameters()).dtype)
    draft_cache = KVCache(draft.config, 1, capacity, dtype=next(draft.parameters()).dtype)

    token = int(next_token_logits(target, torch.tensor([prompt_ids]), target_cache).argmax(-1))
    draft_pending = list(prompt_ids)  # tokens the draft has not read yet
    produced = 0
    while True:
        yield token
        produced += 1
        if produced == max_new_tokens:
            return
        # The draft reads what it has not seen (the prompt, or the last round's correction) and proposes.
        draft_pending.append(token)
        if len(draft_pending) == 2:  # one token at a time: the single-token step is the draft's fast path
            next_token_logits(draft, torch.tensor([draft_pending[:1]]), draft_cache)
            draft_pending = draft_pending[1:]
        proposals = []
        for _ in range(min(draft_tokens, max_new_tokens - produced)):
            logits = next_token_logits(draft, torch.tensor([draft_pending]), draft_cache)
            proposals.append(int(logits.argmax(-1)))
            draft_pending = [proposals[-1]]
        # The target reads the last token and every proposal in one pass: its argmax after each says
        # which proposals it would have produced itself, plus the token that follows the last one it keeps.
        choices = _target_choices(target, [token, *proposals], target_cache)
        accepted = 0
        while accepted < len(proposals) and proposals[accepted] == choices[accepted]:
            accepted += 1
        stats.rounds += 1
        stats.proposed += len(proposals)
        stats.accepted += accepted
        # Keep the cache entries of accepted tokens only; the draft never read its last proposal.
        target_cache.length += 1 + accepted
        draft_cache.length = target_cache.length - 1 if accepted == len(proposals) else target_cache.length
        draft_pending = [proposals[-1]] if accepted == len(proposals) else []
        for kept in proposals[:accepted]:
            yield kept
            produced += 1
            if produced == max_new_tokens:
                return
        token = choices[accepted]


def _target_choices(target: Transformer, tokens: list[int], cache: KVCache) -> list[int]:
    """The target's argmax after each of `tokens`, which continue the sequence in `cache` (whose
    length is left for the caller to set). With the native decode kernels the tokens go through as
    rows of one decoding step, each at its own position of the same cache row: the step stores every
    row's key and value before any row attends, so row i sees the tokens before it. Each row's sums
    are the ones single-token decoding does, so the choices equal plain greedy decoding's exactly."""
    start = cache.length
    if engine.supports(target):
        positions = torch.arange(start, start + len(tokens))
        rows = torch.zeros(len(tokens), dtype=torch.long)
        logits = engine.decode_step(target, torch.tensor(tokens)[:, None], cache, positions, rows)
    else:
        logits = target.logits(target.hidden_states(torch.tensor([tokens]), cache)[0])
        cache.length = start
    return logits.argmax(-1).tolist()
