"""The decoding step on CPU: one new token per sequence through native kernels.

`model.forward` stays the reference and does prefill (many tokens: PyTorch's batched
matmuls are the right tool). Decoding feeds one token per sequence, where PyTorch spends
more time dispatching ~40 small operators per layer than computing; `decode_step` runs the
same maths as `Transformer.hidden_states` + LM head with a few native calls per layer. It
covers the RMSNorm + RoPE families (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3: SwiGLU or GeGLU,
q/k/v biases, q/k norms, branch norms, sliding windows, per-layer RoPE tables) on CPU in fp32
activations; `supports` says when, and callers fall back to the model itself otherwise.
"""

from __future__ import annotations

import os
import time
import weakref

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.inference import kernels
from lmforge.inference.quantize import FastLinear, QuantizedLinear, bf16_products
from lmforge.model import KVCache, Transformer

# Decoding threads. A step is ~150 fork-joins of 10-50 microseconds each, so one thread that the
# OS parks for a time slice (milliseconds) to run another process stalls every join behind it:
# SmolLM2 Q4_1 on 2 cores went from 86 tok/s to 31 with one busy process beside it, while one
# thread kept 83 (decoding is memory-bound; a second thread adds ~15% on an idle machine). So
# unless told a number, each step's thread count is chosen from measured step times.
_UNSET = object()
_fixed_threads: int | None | object = _UNSET  # read from $LMFORGE_THREADS at the first step unless set


def set_decode_threads(threads: int | None) -> None:
    """Fix the threads of every decoding step and PyTorch op (`--threads`), or None to choose them
    per step from measured speed (the default; `$LMFORGE_THREADS` fixes them too)."""
    global _fixed_threads
    if threads is not None:
        if threads < 1:
            raise LmforgeError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    _fixed_threads = threads


def threads_from_environment() -> int | None:
    """`$LMFORGE_THREADS` as a number, None when unset or empty."""
    value = os.environ.get("LMFORGE_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise LmforgeError(f"LMFORGE_THREADS must be a whole number of threads >= 1, got {value!r}")
    return int(value)


def free_cores(looks: int = 3) -> int | None:
    """Cores this process may use that no other runnable task wants right now: the kernel's count of
    runnable tasks (/proc/loadavg, which counts this reader too), the least of a few looks 2 ms
    apart since one look can catch a thread on its way to sleep. None where it cannot be read."""
    try:
        usable = len(os.sched_getaffinity(0))
        running = []
        for look in range(looks):
            if look:
                time.sleep(0.002)
            with open("/proc/loadavg") as loadavg:
                running.append(int(loadavg.read().split()[3].split("/")[0]))
    except (OSError, AttributeError, ValueError, IndexError):
        return None
    return max(1, usable - (min(running) - 1))


class ThreadChooser:
    """Picks each decoding step's thread count from the measured time of recent steps.

    Candidates are `most`, most/2, most/4 ... 1. Steps run on the current count, whose estimate is a
    moving average of seconds per step. Every `EXPLORE_EVERY` steps two steps run on a neighbouring
    count (the first pays for waking or parking threads and is not timed), and the current count
    moves there if the second was faster. More threads are tried only when that many cores look
    free (`cores_free_now`), and each such try that loses doubles the wait before the next, up to
    `EXPLORE_AT_MOST_EVERY` steps: on 2 cores beside 2 busy processes one two-thread step took 1.2 s,
    waiting for its second thread to be scheduled, where one-thread steps took 10-30 ms. Fewer threads
    that lose back off too, up to `EXPLORE_FEWER_AT_MOST_EVERY` steps: a server's 16-row step on one
    thread of two costs ~45% more, and trying it every 24 steps cost ~4% of its tokens/s. A step that
    takes `SLOWDOWN` times the current count's average (another process took a core) makes the next
    exploration try fewer threads again."""

    EXPLORE_EVERY = 24
    EXPLORE_AT_MOST_EVERY = 24 * 16
    EXPLORE_FEWER_AT_MOST_EVERY = 24 * 8
    SMOOTHING = 0.3
    SLOWDOWN = 1.5

    def __init__(self, most: int, free: int | None = None, cores_free_now=lambda: free_cores(looks=1)):
        self.candidates = sorted({max(1, most >> shift) for shift in range(most.bit_length())}, reverse=True)
        self.seconds: dict[int, float] = {}
        # start from the most threads that fit the cores other processes leave free
        self.current = next((n for n in self.candidates if n <= (free or most)), 1)
        self.cores_free_now = cores_free_now
        self.steps = 0
        self.exploring: int | None = None
        self._explore_up = False
        self._wait_up, self._next_up = self.EXPLORE_EVERY, 0
        self._wait_down, self._next_down = self.EXPLORE_EVERY, 0

    def pick(self) -> tuple[int, bool]:
        """This step's thread count, and whether its time is to be recorded."""
        self.steps += 1
        if self.exploring is not None:
            return self.exploring, True  # the second, timed step of an exploration
        # steps 1 and 2 time the starting count; explorations begin at step 3
        if self.steps % self.EXPLORE_EVERY == 3 and len(self.candidates) > 1:
            self.exploring = self._neighbour()
            if self.exploring is not None:
                return self.exploring, False
        return self.current, self.steps > 1  # the very first step also starts the thread pool

    def _neighbour(self) -> int | None:
        """A count next to the current one, alternately more and fewer threads where both may be tried."""
        index = self.candidates.index(self.current)  # candidates run from most threads to one
        more = self.candidates[index - 1] if index > 0 else None
        fewer = self.candidates[index + 1] if index + 1 < len(self.candidates) else None
        if more is not None and (self.steps < self._next_up or (self.cores_free_now() or more) < more):
            more = None
        if fewer is not None and self.steps < self._next_down:
            fewer = None
        self._explore_up = not self._explore_up
        return (more or fewer) if self._explore_up else (fewer or more)

    def record(self, threads: int, seconds: float) -> None:
        if threads != self.exploring:
            previous = self.seconds.get(threads)
            if previous is not None and seconds > self.SLOWDOWN * previous:
                self._wait_down, self._next_down = self.EXPLORE_EVERY, 0
            self.seconds[threads] = seconds if previous is None else previous + self.SMOOTHING * (seconds - previous)
            return
        self.exploring = None
        self.seconds[threads] = seconds
        won = seconds < self.seconds.get(self.current, float("inf"))
        if threads > self.current:
            self._wait_up = self.EXPLORE_EVERY if won else min(2 * self._wait_up, self.EXPLORE_AT_MOST_EVERY)
            self._next_up = self.steps + self._wait_up
        else:
            self._wait_down = self.EXPLORE_EVERY if won else min(2 * self._wait_down, self.EXPLORE_FEWER_AT_MOST_EVERY)
            self._next_down = self.steps + self._wait_down
        if won:
            self.current = threads


_choosers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {batch size: ThreadChooser}
_most_threads: int | None = None  # PyTorch's thread count before the first chosen step changed it


def _chooser(model: Transformer, batch: int) -> ThreadChooser:
    global _most_threads
    if _most_threads is None:
        _most_threads = torch.get_num_threads()
    per_batch = _choosers.setdefault(model, {})
    if batch not in per_batch:
        per_batch[batch] = ThreadChooser(_most_threads, free=free_cores())
    return per_batch[batch]


def use_prefill_threads(model: Transformer) -> None:
    """Set PyTorch's threads for a prompt's prefill: the count decoding last found fastest for one
    row, or at first the cores free now. Prefill's matmuls fork and join too: SmolLM2's 512-token
    prefill ran at 213 tok/s on one thread and 16 on two beside other busy processes."""
    if fixed_threads() is None:
        _use_threads(_chooser(model, 1).current)


def fixed_threads() -> int | None:
    """The count `set_decode_threads` fixed (at first use, `$LMFORGE_THREADS`'s), None when chosen per step."""
    if _fixed_threads is _UNSET:
        set_decode_threads(threads_from_environment())
    return _fixed_threads


def _use_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_timed_step(model: Transformer, batch: int, step):
    """`step(threads)` with the thread count fixed by `set_decode_threads`, or else chosen (and then
    measured) by this model's chooser for `batch` rows; the step's own result. A chosen count is
    left set for PyTorch too: sampling's ops over the vocabulary between steps fork and join as
    well, and put back at two threads they cost a busy machine as much as the step saved."""
    if fixed_threads() is not None:
        return step(fixed_threads())
    chooser = _chooser(model, batch)
    threads, measured = chooser.pick()
    _use_threads(threads)
    start = time.perf_counter()
    result = step(threads)
    if measured:
        chooser.record(threads, time.perf_counter() - start)
    return result


def supports(model: Transformer) -> bool:
    """Whether the native step runs this model: the Llama family and the switches of Qwen2/3, Gemma 3
    and Mistral (biases on q/k/v only, q/k norms, branch norms, GeGLU, sliding windows, any RoPE
    scaling: it reads the model's own tables), on CPU in fp32."""
    config = model.config
    return (
        kernels.available()
        and config.norm == "rmsnorm"
        and config.positions == "rope"
        and config.mlp in ("swiglu", "geglu")
        and not config.bias
        and config.n_heads % config.kv_heads == 0
        and model.rope_cos.device.type == "cpu"
        and model.rope_cos.dtype == torch.float32
        and model.final_norm.weight.dtype == torch.float32
    )


def layer_rope_tables(model: Transformer, positions: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) of each layer, covering `positions` (Gemma 3's sliding layers have their own)."""
    uses_local = [model.uses_local_rope(layer) for layer in range(model.config.n_layers)]
    tables = {local: model.rope_for(positions, local) for local in set(uses_local)}
    return [tables[local] for local in uses_local]


class DecodePlan:
    """Every native call of one step for up to `capacity` rows, prepared once per thread count and row
    count: buffers allocated, pointers and sizes resolved. A step is then ~7 plain ctypes calls per
    layer; the Python around each call was a quarter of the step when it went through the modules.

    A row is one new token at its own cache row and position. Decoding gives each sequence one row; a
    short prefill gives a sequence's k new tokens k rows at consecutive positions (`run_prompts`),
    which the attention kernel makes causal among themselves."""

    def __init__(self, model: Transformer, cache: KVCache, capacity: int):
        config = model.config
        d, width = config.d_model, (config.n_heads + 2 * config.kv_heads) * config.head_dim
        buffer = lambda *shape: torch.empty(*shape)  # noqa: E731
        self.model, self.capacity = model, capacity
        self.keys, self.values, self.cache_length = cache.keys, cache.values, cache.max_length
        self.x, self.h, self.delta = buffer(capacity, d), buffer(capacity, d), buffer(capacity, d)
        self.y = buffer(capacity, config.n_heads * config.head_dim)  # the attention's output: d wide only if d_head is
        self.qkv, self.up = buffer(capacity, width), buffer(capacity, 2 * config.mlp_hidden)
        self.gated = buffer(capacity, config.mlp_hidden)
        self.last = buffer(capacity, d)  # final-norm rows the LM head reads (a prefill's last tokens)
        # logits, made on first use: a row per decoding row, or (prefill) a row per prompt, at most one per
        # cache row (64 rows of Qwen3's vocabulary would be 39 MB). Decoding rows may outnumber cache rows:
        # speculative decoding checks its draft as rows of one sequence.
        self.cache_rows = cache.keys[0].shape[0]
        self._logits: dict[bool, torch.Tensor] = {}
        self._scores: dict[int, torch.Tensor] = {}  # per thread count: attention_decode's scratch
        self.positions = torch.zeros(capacity, dtype=torch.long)
        self.slots = torch.zeros(capacity, dtype=torch.long)
        # scratch tensors whose pointers the calls hold, and each layer's RoPE tables as they are now: the
        # model may grow (replace) its own later, and this plan's positions never pass the cache's length
        self.rope_tables = layer_rope_tables(model, min(cache.max_length, config.block_size))
        self._scratch: dict[int, list[torch.Tensor]] = {}
        self._calls_by_shape: dict[tuple[int, int], list] = {}
        self._head_by_shape: dict[tuple[int, int, bool], tuple] = {}

    def _calls(self, threads: int, rows: int) -> list:
        """The layers' calls for `rows` rows (x in, final-norm rows in `h` out)."""
        if (threads, rows) in self._calls_by_shape:
            return self._calls_by_shape[threads, rows]
        library, config = kernels.library(), self.model.config
        d = config.d_model
        blocks = self.model.blocks
        first = blocks[0].attention_norm
        calls = [
            (library.rms_norm, (self.x.data_ptr(), first.weight.data_ptr(), first.eps, rows, d, self.h.data_ptr()))
        ]
        for layer, block in enumerate(blocks):
            attention = block.attention
            following = blocks[layer + 1].attention_norm if layer + 1 < len(blocks) else self.model.final_norm
            rope_cos, rope_sin = self.rope_tables[layer]
            q_norm, k_norm = (attention.q_norm, attention.k_norm) if config.qk_norm else (None, None)
            calls += [
                self._matvec(attention.qkv, self.h, rows, self.qkv, threads),
                (library.attention_decode, (
                    self.qkv.data_ptr(), rows, config.n_heads, config.kv_heads, config.head_dim,
                    self.slots.data_ptr(), self.positions.data_ptr(), self.keys[layer].data_ptr(),
                    self.values[layer].data_ptr(), self.cache_length, rope_cos.data_ptr(), rope_sin.data_ptr(),
                    q_norm and q_norm.weight.data_ptr(), k_norm and k_norm.weight.data_ptr(),
                    q_norm.eps if q_norm else 0.0, config.attention_scale or config.head_dim**-0.5,
                    config.sliding_window if config.is_sliding(layer) else 0, self._scores_for(threads).data_ptr(),
                    self.y.data_ptr(), threads,
                )),
                self._matvec(attention.out, self.y, rows, self.delta, threads),
                *self._post_norm(block.attention_post_norm if config.post_norms else None, rows),
                (library.add_rms_norm, (self.x.data_ptr(), self.delta.data_ptr(), block.mlp_norm.weight.data_ptr(),
                                        block.mlp_norm.eps, rows, d, self.h.data_ptr())),
                self._matvec(block.mlp.up, self.h, rows, self.up, threads),
                (library.gelu_tanh_mul if config.mlp == "geglu" else library.silu_mul,
                 (self.up.data_ptr(), rows, config.mlp_hidden, self.gated.data_ptr())),
                self._matvec(block.mlp.down, self.gated, rows, self.delta, threads),
                *self._post_norm(block.mlp_post_norm if config.post_norms else None, rows),
                (library.add_rms_norm, (self.x.data_ptr(), self.delta.data_ptr(), following.weight.data_ptr(),
                                        following.eps, rows, d, self.h.data_ptr())),
            ]  # fmt: skip
        self._calls_by_shape[threads, rows] = calls
        return calls

    def _scores_for(self, threads: int) -> torch.Tensor:
        if threads not in self._scores:  # a run of positions per query head of a kv group, per thread
            group = self.model.config.n_heads // self.model.config.kv_heads
            self._scores[threads] = torch.empty(threads * group * self.cache_length)
        return self._scores[threads]

    def _logits_for(self, from_last: bool) -> torch.Tensor:
        if from_last not in self._logits:
            rows = min(self.capacity, self.cache_rows) if from_last else self.capacity
            self._logits[from_last] = torch.empty(rows, self.model.config.vocab_size)
        return self._logits[from_last]

    def _head(self, threads: int, rows: int, from_last: bool) -> tuple:
        """The LM head's call on `rows` final-norm rows, read from `h` (decoding) or `last` (a prefill's)."""
        key = (threads, rows, from_last)
        if key not in self._head_by_shape:
            source, logits = (self.last if from_last else self.h), self._logits_for(from_last)
            self._head_by_shape[key] = self._matvec(self.model.lm_head, source, rows, logits, threads)
        return self._head_by_shape[key]

    def _post_norm(self, norm, rows: int) -> list:
        """Gemma 3's norm of a block part's output before its residual add (in place on `delta`); none without."""
        if norm is None:
            return []
        width = self.delta.shape[1]
        delta = self.delta.data_ptr()
        return [(kernels.library().rms_norm, (delta, norm.weight.data_ptr(), norm.eps, rows, width, delta))]

    def _activation_scratch(self, inner: int) -> list[torch.Tensor]:
        """x rounded to int8, with a scale and a sum per 32 values, for `capacity` rows of width `inner`;
        one set per width serves every call of that width, since the calls run one at a time."""
        if inner not in self._scratch:
            rows, blocks = self.capacity, inner // 32
            self._scratch[inner] = [torch.empty(rows, inner, dtype=torch.int8), torch.empty(rows, blocks),
                                    torch.empty(rows, blocks)]  # fmt: skip
        return self._scratch[inner]

    def _matvec(self, layer, x: torch.Tensor, rows: int, out: torch.Tensor, threads: int):
        library = kernels.library()
        inner = x.shape[1]
        bias = 0 if layer.bias is None else layer.bias.data_ptr()
        head = (x.data_ptr(), rows, inner)  # every matvec starts with x, its rows and width
        if not isinstance(layer, QuantizedLinear):
            tail = (bias, layer.out_features, out.data_ptr(), threads)
            return library.matvec_f32, (*head, layer.weight.detach().data_ptr(), *tail)
        if layer.segments is None and layer.bits == 8 and layer.exact_activations:
            tail = (layer.group_size, bias, layer.out_features, out.data_ptr(), threads)
            return library.matvec_q8_exact, (*head, layer.codes.data_ptr(), layer.scale.data_ptr(), *tail)
        scratch = self._activation_scratch(inner)
        tail = (bias, layer.out_features, out.data_ptr(), *(t.data_ptr() for t in scratch), threads)
        if layer.segments is not None:  # GGUF blocks (kquants.c), of one type or several
            table = layer.segment_table
            return library.matvec_blocks, (*head, layer.codes.data_ptr(), table.data_ptr(), table.shape[0], *tail)
        codes, scale, tail = layer.codes.data_ptr(), layer.scale.data_ptr(), (layer.group_size, *tail)
        if layer.bits == 8:
            return library.matvec_q8, (*head, codes, scale, *tail)
        return library.matvec_q4, (*head, codes, scale, layer.offset.data_ptr(), *tail)

    @staticmethod
    def fits(model: Transformer) -> bool:
        """Every Linear is one the native calls can run (fp32 contiguous, int8/int4 with 32-column groups, or
        GGUF blocks, whose rows are whole blocks by construction);
        anything else in their place (a LoRA wrapper, say) leaves decoding to the model's own forward."""
        linears = [model.lm_head]
        for block in model.blocks:
            linears += [block.attention.qkv, block.attention.out, block.mlp.up, block.mlp.down]
        for layer in linears:
            if isinstance(layer, QuantizedLinear):
                if layer.in_features % 32:
                    return False
            elif isinstance(layer, nn.Linear):
                if layer.weight.dtype != torch.float32 or not layer.weight.is_contiguous():
                    return False
            else:
                return False
        return True

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, threads: int) -> None:
        rows = tokens.shape[0]
        self.positions[:rows].copy_(positions)
        self.slots[:rows].copy_(slots)
        self.x[:rows].copy_(self.model.embed(tokens))
        for function, arguments in self._calls(threads, rows):
            function(*arguments)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, threads: int) -> torch.Tensor:
        """Logits (rows, vocab) of one new token per row: tokens, positions and slots (rows,)."""
        rows = tokens.shape[0]
        self._layers(tokens, positions, slots, threads)
        function, arguments = self._head(threads, rows, from_last=False)
        function(*arguments)
        return self.model.soft_cap(self._logits_for(False)[:rows].clone())

    def run_prompts(self, prompts: list[list[int]], starts: list[int], slots: list[int], threads: int) -> torch.Tensor:
        """Logits (B, vocab) at each prompt's last token, prompt b's tokens going into cache row `slots[b]`
        from position `starts[b]`: all prompts' tokens as rows, `capacity` rows per pass, in order, so a
        later pass sees the entries an earlier one wrote."""
        if len(prompts) > min(self.capacity, self.cache_rows):
            raise ValueError(f"{len(prompts)} prompts for a cache of {self.cache_rows} rows")
        tokens = torch.tensor([token for prompt in prompts for token in prompt], dtype=torch.long)
        positions = torch.cat([torch.arange(start, start + len(prompt)) for prompt, start in zip(prompts, starts)])
        row_slots = torch.cat([torch.full((len(prompt),), slot) for prompt, slot in zip(prompts, slots)])
        ends = torch.tensor([len(prompt) for prompt in prompts]).cumsum(0)
        for first in range(0, tokens.shape[0], self.capacity):
            stop = min(first + self.capacity, tokens.shape[0])
            self._layers(tokens[first:stop], positions[first:stop], row_slots[first:stop], threads)
            for index, end in enumerate(ends.tolist()):
                if first < end <= stop:
                    self.last[index].copy_(self.h[end - 1 - first])
        function, arguments = self._head(threads, len(prompts), from_last=True)
        function(*arguments)
        return self.model.soft_cap(self._logits_for(True)[: len(prompts)].clone())


# cache -> {(id(model), capacity): DecodePlan, or None where the model's layers have no native calls}.
# Per cache since a plan holds its tensors' addresses; a plan must not refer to its cache, which would
# then never leave this dictionary.
_decode_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: Transformer, cache: KVCache, capacity: int) -> DecodePlan | None:
    plans = _decode_plans.setdefault(cache, {})
    key = (id(model), capacity)
    if key not in plans:
        plans[key] = DecodePlan(model, cache, capacity) if DecodePlan.fits(model) else None
    return plans[key]


def decode_step(
    model: Transformer,
    tokens: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token logits (B, vocab) for one new token per row, tokens (B, 1).

    Positions and cache rows as in `Transformer.forward`: aligned at `cache.length` when
    `positions` is None (and the cache then advances), else per row.
    """
    config = model.config
    batch = tokens.shape[0]
    aligned = positions is None
    if aligned:
        positions = torch.full((batch,), cache.length, dtype=torch.long)
    if slots is None:
        slots = torch.arange(batch)
    position_limit = min(cache.max_length, config.block_size)
    if int(positions.max()) >= position_limit:
        raise ValueError(f"position {int(positions.max())} does not fit the cache/context of {position_limit}")
    plan = _plan(model, cache, batch)
    if plan is None:  # a layer the native calls cannot run (say bf16 weights): the model's own forward
        return torch_decode_step(model, tokens, cache, None if aligned else positions, None if aligned else slots)
    logits = run_timed_step(model, batch, lambda threads: plan.run(tokens.reshape(batch), positions, slots, threads))
    if aligned:
        cache.length += 1
    return logits


# Prompt tokens up to which a prefill runs as rows of the native step rather than through the model's
# forward, and the rows per native pass. A short prefill (a chat turn's tail after a cached prefix)
# through the forward pays PyTorch's per-op overhead over every layer: SmolLM2-135M's 3-token tail took
# 36-55 ms there against 11-13 ms for a one-token step. Natively each row costs about a decode step's
# share of the kernels, while the forward's matmuls amortise dequantisation over the rows, so past a
# few dozen rows the forward wins. Measured (k tokens after 200 cached, 1 thread, interleaved in one
# process on a busy 2-core machine; forward time / native time): SmolLM2 Q4_1 k=8 1.25-1.40x,
# k=32 0.81-1.09x, k=64 0.57-0.83x; SmolLM2 Q4_K_M k=8 1.45x, k=32 1.34x, k=64 0.79x; Qwen3-0.6B-shape
# Q4_K_M k=8 1.26x, k=32 1.68x, k=64 1.06x.
NATIVE_PREFILL_TOKENS = 32
NATIVE_PREFILL_ROWS = 64


def native_prefill(
    model: Transformer, prompts: list[list[int]], cache: KVCache, starts: list[int], slots: list[int]
) -> torch.Tensor | None:
    """`prefill` through the native step (each prompt's tokens as rows, `DecodePlan.run_prompts`), or
    None where it does not apply: a model or layer it cannot run, a long or empty prompt."""
    total = sum(len(prompt) for prompt in prompts)
    if not 0 < total <= NATIVE_PREFILL_TOKENS or min(len(prompt) for prompt in prompts) == 0:
        return None
    if not supports(model) or cache.keys[0].dtype != torch.float32 or cache.keys[0].device.type != "cpu":
        return None
    limit = min(cache.max_length, model.config.block_size)
    if max(start + len(prompt) for prompt, start in zip(prompts, starts)) > limit:
        raise ValueError(f"a prompt does not fit the cache/context of {limit} positions")
    plan = _plan(model, cache, NATIVE_PREFILL_ROWS)
    if plan is None:
        return None
    threads = fixed_threads() or _chooser(model, 1).current
    _use_threads(threads)
    return plan.run_prompts(prompts, starts, slots, threads)


def torch_decode_step(
    model: Transformer,
    tokens: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's own forward for one new token per row, on the thread count `run_timed_step` chooses."""

    def step(threads: int) -> torch.Tensor:  # PyTorch's ops run on the count run_timed_step set
        hidden = model.hidden_states(tokens, cache, positions, slots)
        return model.logits(hidden[:, -1]).float()

    return run_timed_step(model, tokens.shape[0], step)


# Prompt tokens per pass of a single-row prefill. Each pass dequantises every weight again, so 512 over
# 256 (SmolLM2 Q6_K 512-token prefill in bf16 on one thread: 1,049 -> 944 ms; Qwen3-0.6B 3,308 -> 2,776).
PREFILL_CHUNK = 512


def next_token_logits(
    model: Transformer,
    tokens: torch.Tensor,
    cache: KVCache | None,
    positions: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    last: torch.Tensor | None = None,
    embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, vocab) at each row's last position (or at index `last` per row), running the
    LM head on those positions only: during prefill it would otherwise be the biggest matmul.
    `embeddings` (B, T, d_model), if given, are the model's input in place of the tokens' own
    (a prompt with image features, `lmforge.apps.vlm`); they always go through the model's forward."""
    if tokens.shape[1] == 1 and cache is not None and last is None and embeddings is None:
        if supports(model):
            return decode_step(model, tokens, cache, positions, slots)
        return torch_decode_step(model, tokens, cache, positions, slots)
    if cache is not None and last is None and not cache.static and embeddings is None:
        batch, length = tokens.shape
        starts = [cache.length] * batch if positions is None else positions.tolist()
        rows = list(range(batch)) if slots is None else slots.tolist()
        logits = native_prefill(model, tokens.tolist(), cache, starts, rows)
        if logits is not None:
            if positions is None:
                cache.length += length
            return logits
    use_prefill_threads(model)
    with bf16_products():
        if cache is not None and positions is None and last is None:
            # A long prompt goes through in chunks: the cache carries the context between them, and each
            # pass's activations (and dequantised weights) stay a chunk's size, not the prompt's.
            while tokens.shape[1] > PREFILL_CHUNK:
                chunk = None if embeddings is None else embeddings[:, :PREFILL_CHUNK]
                model.hidden_states(tokens[:, :PREFILL_CHUNK], cache, embeddings=chunk)
                tokens = tokens[:, PREFILL_CHUNK:]
                embeddings = None if embeddings is None else embeddings[:, PREFILL_CHUNK:]
        hidden = model.hidden_states(tokens, cache, positions, slots, embeddings=embeddings)
    if last is None:
        hidden = hidden[:, -1]
    else:
        hidden = hidden[torch.arange(hidden.shape[0]), last]
    return model.logits(hidden).float()


def prefill(
    model: Transformer,
    prompts: list[list[int]],
    cache: KVCache,
    slots: torch.Tensor | None = None,
    starts: list[int] | None = None,
    embeddings: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Run several prompts in one pass, each into its cache row (`slots`, default 0..B-1) from
    position `starts[row]` (default 0: a row with a start continues the entries its cache row
    already holds, a cached prefix); logits (B, vocab) at each prompt's last token. `embeddings`:
    per prompt, None or its input embeddings (len(prompt), d_model) in place of its tokens' own
    (a prompt with image tokens, `lmforge.apps.vlm`).

    The batch is right-padded to the longest prompt. A row's padding writes cache entries past
    its length, which its own later tokens overwrite before any query can see them.
    """
    starts = starts or [0] * len(prompts)
    # The native rows read token embeddings only: prompts with image features go through the forward.
    has_embeddings = embeddings is not None and any(e is not None for e in embeddings)
    if not cache.static and not has_embeddings:
        rows = list(range(len(prompts))) if slots is None else slots.tolist()
        logits = native_prefill(model, prompts, cache, starts, rows)
        if logits is not None:
            return logits
    device = cache.keys[0].device
    lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
    padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt)
    positions = torch.tensor(starts, dtype=torch.long, device=device)
    inputs = None
    if has_embeddings:
        inputs = model.embed(padded)
        for row, given in enumerate(embeddings):
            if given is not None:
                inputs[row, : len(prompts[row])] = given.to(inputs.dtype)
    return next_token_logits(
        model, padded, cache, positions=positions, slots=slots, last=lengths - 1, embeddings=inputs
    )


def _static_decode(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache):
    """Next-token logits for one token per row (cache rows 0..B-1) at `positions`: the model's own
    forward over a static cache, whose shapes never change, so `torch.compile` builds one graph."""
    return model.logits(model.hidden_states(tokens, cache, positions)[:, -1]).float()


_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled step, False where none


def compiled_decode_step(model: Transformer):
    """`torch.compile` of the static decode step for `model` (built once per model), or None where
    compilation is unavailable; `generate_tokens(..., compile=True)` then falls back cleanly."""
    native = kernels.available()  # build/load the kernels and register their operators outside the trace
    if native:
        kernels.custom_ops()
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, FastLinear)):
            module.native_when_compiled = native
    cached = _compiled_steps.get(model)
    if cached is None:
        try:
            cached = torch.compile(_static_decode, dynamic=False, fullgraph=False)
        except Exception:  # noqa: BLE001 - no compiler/backend: run uncompiled
            cached = False
        _compiled_steps[model] = cached
    if not cached:
        return None

    def step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache):
        """Logits (B, vocab) for `tokens` (B, 1) at `positions` (B,) in a `KVCache(static=True)`."""
        if model.config.positions == "rope":  # grown outside the graph, which then only reads the tables
            model.rope_for(cache.max_length)
            if model.config.rope_local_theta is not None:
                model.rope_for(cache.max_length, local=True)
        return cached(model, tokens, positions, cache)

    return step
