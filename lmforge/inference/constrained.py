"""Grammar-constrained decoding: every sampled token keeps the output inside a JSON Schema or a Lark grammar
(`SamplingConfig.json_schema` / `.grammar`), in every decode path.

Before each sampling step a sequence's `GrammarMatcher` gives the set of tokens that can continue a valid
output (a bitmask, one bit per token); the others get logit -inf, so temperature, top-k and top-p work on
the allowed tokens only. The sequence ends ("stop") once the grammar admits nothing more; where it could
end or go on, the model's stop tokens are among the allowed ones.

The library is llguidance (guidance-ai; Rust, one abi3 wheel, no Python dependencies), chosen over xgrammar
by measurement on this 2-core CPU with SmolLM2's 49k-token vocabulary (`benchmarks/structured.py --libraries`,
three runs, load average 7-11; xgrammar 0.2.9 installed without its dependencies for the measurement only):

                                     llguidance 1.9   xgrammar 0.2.9
    tokenizer index (once per model)   0.42-0.57 s     0.06-0.07 s
    compile a schema (every request)   1.0-5.7 ms      13-26 ms
    mask per token, median             11-30 us        1.9-5.2 us
    advance past a token               ~1.2 us         ~1.1 us

Either mask is a fraction of a percent of a decoding step (~12 ms for SmolLM2 on an idle core here; 25-40 ms
under that load), so xgrammar's faster masks would save little, while its slower compilation is paid by every
request that brings a schema. And xgrammar imports transformers at import time (and asks for triton and torch),
which lmforge does not depend on; llguidance also takes the Lark grammars (with JSON Schemas embedded by %json)
that tool calling's constrained calls are written in. Measured in the same runs, a constrained step spends
3-4% of its time in the grammar (mask, its application, advancing the matcher).
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.settings import SamplingConfig
from lmforge.tokenizer import Tokenizer, stop_token_ids, token_bytes

# One LLTokenizer per Tokenizer: building its token index takes ~0.25 s for a 49k vocabulary.
_guidance_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_guidance_lock = threading.Lock()
# Where a core is free for it, masks are computed here while the model runs its step (llguidance releases the
# GIL), so a step waits for a mask only when computing it took longer than the forward pass.
_mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-grammar")
_executor: llguidance.LLExecutor | None = None


class _TokenTable:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the special ids, and a way to tokenize."""

    def __init__(self, tokenizer: Tokenizer, end_ids: list[int]):
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        self.eos_token_id = end_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


def guidance_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (built once per tokenizer), whose end-of-sequence tokens are the
    model's stop tokens: where the grammar may end, any of them may be sampled."""
    with _guidance_lock:
        built = _guidance_tokenizers.get(tokenizer)
        if built is None:
            end_ids = sorted(stop_token_ids(tokenizer))
            if not end_ids:
                raise LmforgeError("constrained decoding needs a tokenizer with an end-of-text token")
            table = _TokenTable(tokenizer, end_ids)
            built = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(table), n_vocab=tokenizer.vocab_size, eos_token=end_ids
            )
            _guidance_tokenizers[tokenizer] = built
        return built


class GrammarMatcher:
    """Follows one sequence through its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, tokenizer: Tokenizer, grammar: str):
        guidance = guidance_tokenizer(tokenizer)
        self.mask_words = (guidance.vocab_size + 31) // 32  # one bit per token
        self.matcher = llguidance.LLMatcher(guidance, grammar, log_level=0)
        if self.matcher.is_error():
            raise LmforgeError(f"the grammar cannot be used with this tokenizer: {self.matcher.get_error()}")

    def consume(self, token: int) -> None:
        """Advance past the sampled `token` (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise LmforgeError(f"constrained decoding failed at token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """True once the grammar admits no further token (the output is whole)."""
        return self.matcher.is_stopped()


def matchers_for(sampling: SamplingConfig, tokenizer: Tokenizer | None, count: int) -> list[GrammarMatcher] | None:
    """One matcher per sequence when `sampling` constrains the output, else None."""
    grammar = sampling.constraint()
    if grammar is None:
        return None
    if tokenizer is None:
        raise LmforgeError("json_schema and grammar need the model's tokenizer: pass tokenizer=...")
    return [GrammarMatcher(tokenizer, grammar) for _ in range(count)]


def masks_in_background(device: torch.device) -> bool:
    """Whether a step's masks are computed on the helper thread, overlapping the model's step: when the step runs
    on an accelerator, or leaves CPU cores that decoding does not use. Where decoding takes every core (this
    2-core machine), the handover cost more than it hid: 2.6 ms a token on the helper thread against 1.2 ms
    computed in line, same run, load average ~10 (benchmarks/structured.py), as the thread waited for a core."""
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


class TokenMasks:
    """The allowed-token masks of one decoding step's rows, computed while the model runs that step where a
    core is free for it (`masks_in_background`), else when `start` is called.

    `start` takes the rows' matchers (None for an unconstrained row); `apply` sets the logits of the tokens
    each row's grammar disallows to -inf. Between the two, the matchers must not be touched.
    """

    def __init__(self, device: torch.device):
        self.background = masks_in_background(device)
        self.pending: Future | None = None
        self.rows: list[int] = []

    def start(self, matchers: list[GrammarMatcher | None]) -> None:
        self.rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        if not self.rows:
            self.pending = None
            return
        constrained = [matchers[row] for row in self.rows]
        arguments = ([m.matcher for m in constrained], constrained[0].mask_words, self.background)
        if self.background:
            self.pending = _mask_thread.submit(_fill_masks, *arguments)
        else:
            self.pending = Future()
            self.pending.set_result(_fill_masks(*arguments))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (rows, vocab) with every token its row's grammar disallows at -inf (in place)."""
        if self.pending is None:
            return logits
        bitmask = self.pending.result()
        self.pending = None
        # Bit j of 32-bit word w is token 32 w + j: little-endian bytes unpacked little-endian give the tokens
        # in order. In numpy, one thread: PyTorch's masked_fill over 49k logits forks to its threads, and on this
        # busy 2-core machine one of them waiting for a time slice made it 2-10 ms instead of ~0.1 ms
        # (benchmarks/structured.py --libraries); llguidance.torch's helper is torch.compile'd: 2.7-11.5 s at its
        # first call here (~34 us after), a stall no request should meet.
        vocab = min(bitmask.shape[1] * 32, logits.shape[1])
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, count=vocab, bitorder="little").view(np.bool_)
        values = logits.numpy() if logits.device.type == "cpu" else None
        for index, row in enumerate(self.rows):
            if values is not None:
                # np.where's blend takes ~60 us whatever the mask; copyto(where=) took 130 us on a dense one
                values[row, :vocab] = np.where(allowed[index], values[row, :vocab], -np.inf)
                values[row, vocab:] = -np.inf
            else:
                disallowed = torch.from_numpy(~allowed[index]).to(logits.device)
                logits[row, :vocab].masked_fill_(disallowed, float("-inf"))
                logits[row, vocab:] = float("-inf")
        return logits


def _fill_masks(matchers: list[llguidance.LLMatcher], words: int, parallel: bool) -> np.ndarray:
    """Each matcher's mask as a row of `words` 32-bit words; with `parallel`, several rows at once on
    llguidance's threads, else one after another on this thread."""
    global _executor
    bitmask = np.empty((len(matchers), words), dtype=np.int32)
    if len(matchers) == 1 or not parallel:
        for row, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, words * 4)
        return bitmask
    if _executor is None:
        _executor = llguidance.LLExecutor()
    rows = [(matcher, row) for row, matcher in enumerate(matchers)]
    _executor.unsafe_compute_mask_ptr(rows, bitmask.ctypes.data, words * 4, len(matchers))
    return bitmask
