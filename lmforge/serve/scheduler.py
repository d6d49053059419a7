"""Continuous batching: one thread runs the model; requests join and leave the running batch between steps.

Each running sequence owns a row ("slot") of one shared KV cache and its own position, so
sequences of any length decode together in one batched step (`next_token_logits` with
per-row positions). A request that arrives while others decode is prefilled between two
steps and joins the next one; a finished or cancelled request frees its slot at once.

Prefix caching: a slot keeps the keys and values of the tokens it has run (`slot_tokens`) after
its sequence ends. A new request takes the free slot whose tokens share the longest prefix with
its prompt (the earlier turns of a chat, a long system prompt) and prefills only the rest; a
prefix found in a slot still running is copied into the request's own slot instead. The memory
is the slots themselves: a request that matches nothing evicts the least recently used free
slot. Every position is kept (sliding-window layers included), so a prefix's entries are valid
for any sequence that starts with it. A prompt's image tokens count as equal only for the same image
(`Scheduler.prefix_key`).
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.inference import kernels
from lmforge.inference.constrained import GrammarMatcher, TokenMasks, matchers_for
from lmforge.inference.engine import next_token_logits, prefill
from lmforge.inference.generate import (
    SamplingConfig,
    TextStream,
    TokenScore,
    apply_logit_bias,
    apply_repetition_penalty,
    pick_next_token,
    score_prompt,
    score_tokens,
)
from lmforge.model import KVCache, Transformer
from lmforge.tokenizer import Tokenizer

PREFILL_TOKENS = 4096  # padded prompt tokens per batched prefill pass (bounds its attention-mask memory)


def common_prefix_length(cached: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens `cached` and `prompt` share, at most `limit`: a binary search over
    slice comparisons (each one C-speed), not a Python loop over a 2,000-token prompt."""
    low, high = 0, min(len(cached), len(prompt), limit)
    while low < high:
        middle = (low + high + 1) // 2
        if cached[:middle] == prompt[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class QueueFull(Exception):
    """The waiting queue has no room for a request's sequences; the client should retry later."""


@dataclass
class GenerationRequest:
    """One sequence to generate. `emit` receives events from the scheduler thread: ("prompt", scores, None)
    first when `prompt_logprobs` is set, ("text", piece, scores) as tokens arrive, then ("done", finish_reason,
    usage) or ("error", message, None). A piece's scores are those of the tokens it completes (`TokenScore`s,
    empty unless `logprobs` is set): log-softmax of the model's logits plus logit_bias, before the penalties,
    temperature and top-k/top-p reshape them for sampling (the model's view, comparable across requests whatever
    their sampling settings). A stop string's own tokens have none."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0))
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # score each generated token, with this many most likely alternatives
    prompt_logprobs: int | None = None  # score each prompt token too (a completion's echo), in a pass of its own
    cancelled: bool = False  # set by the client side (disconnect); the scheduler frees the slot next step
    submitted_at: float = field(default_factory=time.monotonic)
    # follows sampling.json_schema / .grammar; `Scheduler.submit_all` builds it, on the caller's thread
    matcher: GrammarMatcher | None = None
    # A vision-language model's request: its images (N, C, H, W) as the model's `preprocess_image` left them,
    # read in order into the prompt's runs of image tokens (`Scheduler(vision=...)`)
    images: torch.Tensor | None = None


@dataclass
class _Running:
    request: GenerationRequest
    slot: int
    stream: TextStream
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)
    seen: set[int] = field(default_factory=set)  # prompt and generated tokens, for the repetition penalty
    cached: int = 0  # leading prompt tokens whose entries the slot already held (prefix cache): not prefilled
    prefix_key: list = field(default_factory=list)  # what its prompt's entries are of (`Scheduler.prefix_key`)
    scores: list[TokenScore] = field(default_factory=list)  # of generated tokens whose text is not out yet

    def take_scores(self) -> list[TokenScore]:
        scores, self.scores = self.scores, []
        return scores


class Scheduler:
    """Owns the model and a KV cache of `max_batch` slots; serves requests from a background thread."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_context: int | None = None,
        max_queue: int = 64,
        prefix_cache: bool = True,
        vision=None,
    ):
        """`vision`: a vision-language model (`lmforge.apps.vlm.VisionLanguageModel`) whose language model is
        `model`; with it, requests may carry images."""
        self.model, self.tokenizer, self.vision = model, tokenizer, vision
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(model.config.block_size, max_context or model.config.block_size)
        # the model's device and dtype (bf16 on a GPU): the cache and each step's tensors live there, and each
        # step's logits come back to the CPU, where sampling, grammars and penalties run
        weight = next(model.parameters(), torch.empty(0))
        self.device = weight.device
        self.cache = KVCache(
            model.config,
            max_batch,
            self.context,
            device=self.device,
            dtype=weight.dtype if weight.dtype.is_floating_point else torch.float32,
        )
        self.prefix_cache = prefix_cache
        # least recently used first: a request that matches no cached prefix evicts the front one
        self.free_slots = list(range(max_batch))
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # what each slot's entries are of
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.running: list[_Running] = []
        self.condition = threading.Condition()
        self.accepting = True
        self.drain_deadline: float | None = None  # when draining, the time left running sequences end
        self.stopping = False
        self.metrics = collections.Counter()
        self.thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)

    # ---- client side -------------------------------------------------------------------
    def start(self) -> None:
        kernels.release_threads()  # this thread loaded the model; decoding moves to the scheduler's thread
        self.thread.start()

    def submit(self, request: GenerationRequest) -> None:
        self.submit_all([request])

    def submit_all(self, requests: list[GenerationRequest]) -> None:
        """Queue the sequences of one client request, all or none: ValueError if one cannot fit
        the context or they outnumber the slots, QueueFull if the queue has no room for them. Requests with a
        json_schema or grammar get their matcher here (milliseconds; the first for a tokenizer ~0.3 s), so
        call it off an event loop for those."""
        for request in requests:
            if request.matcher is None:
                request.matcher = (matchers_for(request.sampling, self.tokenizer, 1) or [None])[0]
        for request in requests:
            if request.images is not None:
                self.check_images(request)
            if len(request.prompt_ids) + request.max_tokens > self.context:
                raise ValueError(
                    f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                    f"context of {self.context} tokens"
                )
        if len(requests) > self.max_batch:
            raise ValueError(
                f"this request needs {len(requests)} sequences (prompts x n); the server decodes at most "
                f"{self.max_batch} at once (--max-batch)"
            )
        with self.condition:
            if not self.accepting:
                raise RuntimeError("the server is shutting down")
            if len(self.waiting) + len(requests) > self.max_queue:
                self.metrics["rejected_queue_full_total"] += 1
                raise QueueFull(
                    f"the queue is full ({len(self.waiting)} sequences waiting, limit {self.max_queue}); retry shortly"
                )
            self.waiting.extend(requests)
            self.metrics["requests_total"] += 1
            self.condition.notify()

    def check_images(self, request: GenerationRequest) -> None:
        """A request with images needs a vision-language model and one run of image tokens per image."""
        if self.vision is None:
            raise ValueError("this server's model is a text-only language model and cannot read images")
        found = request.prompt_ids.count(self.vision.image_token_id)
        needed = len(request.images) * self.vision.tokens_per_image
        if found != needed:
            raise ValueError(
                f"the prompt has {found} image tokens for {len(request.images)} image(s) of "
                f"{self.vision.tokens_per_image} tokens each"
            )

    def prefix_key(self, request: GenerationRequest) -> list:
        """What a cached prefix must equal for a slot to reuse it: the prompt's token ids, except that each image
        token stands for its image's content (a digest of its pixels) and its place in the image. The image
        tokens' ids are all alike, but their entries depend on the image: two prompts that differ only in
        their images share no prefix past the first image token; a chat's next turn about the same image
        reuses all of it."""
        if request.images is None:
            return request.prompt_ids
        digests = [hashlib.sha256(image.float().numpy().tobytes()).hexdigest() for image in request.images]
        key, seen = list(request.prompt_ids), 0
        for position, token in enumerate(key):
            if token == self.vision.image_token_id:
                key[position] = (digests[seen // self.vision.tokens_per_image], seen % self.vision.tokens_per_image)
                seen += 1
        return key

    def queue_depth(self) -> int:
        return len(self.waiting)

    def active_sequences(self) -> int:
        return len(self.running)

    def begin_drain(self, drain_seconds: float) -> None:
        """Stop taking requests; queued and running ones go on for `drain_seconds`, then each still
        unfinished ends with finish_reason "length" (its text so far kept)."""
        with self.condition:
            self.accepting = False
            deadline = time.monotonic() + drain_seconds
            self.drain_deadline = min(self.drain_deadline or deadline, deadline)
            self.condition.notify()

    def shutdown(self, drain_seconds: float = 10.0) -> None:
        """Drain (see `begin_drain`; a drain already under way keeps its deadline), then stop the thread."""
        self.begin_drain(drain_seconds)
        while (self.running or self.waiting) and self.thread.is_alive() and time.monotonic() < self.drain_deadline + 1:
            time.sleep(0.02)
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self._end_drain()  # what the thread left (it stopped mid-drain): ended as the drain ends it, usage kept

    # ---- scheduler thread --------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.condition:
                    while not self.stopping and not self.waiting and not self.running:
                        self.condition.wait()
                    if self.stopping:
                        return
                    if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
                        self._end_drain()
                        continue
                    admitted = []
                    while self.waiting and len(admitted) < len(self.free_slots):
                        request = self.waiting.popleft()
                        if not request.cancelled:
                            admitted.append(request)
                admitted = self._score_prompts(admitted)
                # every slot is taken (and every prefix copied) before any prefill writes a slot
                started = [self._start(request) for request in admitted]
                for group in self._prefill_groups(started):
                    self._run_safely(lambda group=group: self._prefill(group), [running.request for running in group])
                if self.running:
                    self._run_safely(self._decode_step, [running.request for running in self.running])

    def _end_drain(self) -> None:
        """The drain time is up: end every sequence where it is."""
        for running in list(self.running):
            self._finish(running, "length")
        while self.waiting:
            request = self.waiting.popleft()
            self.metrics["finished_length_total"] += 1
            request.emit(("done", "length", self._usage(request, 0)))

    def _run_safely(self, step: Callable[[], None], requests: list[GenerationRequest]) -> bool:
        """A failure in one step fails the requests in it, never the scheduler; whether the step succeeded."""
        try:
            step()
            return True
        except Exception as error:  # noqa: BLE001 - report to the client and keep serving
            self.metrics["generation_failures_total"] += 1
            for request in requests:
                request.emit(("error", f"generation failed: {type(error).__name__}: {error}", None))
            failed = [running for running in self.running if running.request in requests]
            self.running = [running for running in self.running if running.request not in requests]
            for running in failed:  # its entries may be half written: evict them first
                self.slot_tokens[running.slot] = []
                self.free_slots.insert(0, running.slot)
            return False

    def _score_prompts(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Score the prompts of the requests that ask for it (echo), each in one pass of its own: the batched
        prefill computes the LM head at each prompt's last position only. The requests that still have tokens
        to generate; one with max_tokens=0 (lm-evaluation-harness's scoring) ends here, taking no slot."""
        remaining = []
        for request in requests:
            if request.prompt_logprobs is not None:
                if not self._run_safely(lambda request=request: self._emit_prompt_scores(request), [request]):
                    continue
            if request.max_tokens > 0:
                remaining.append(request)
                continue
            self.metrics["prompt_tokens_total"] += len(request.prompt_ids)
            self.metrics["finished_length_total"] += 1
            request.emit(("done", "length", self._usage(request, 0)))
        return remaining

    def _emit_prompt_scores(self, request: GenerationRequest) -> None:
        sampling = request.sampling
        scores = score_prompt(self.model, request.prompt_ids, request.prompt_logprobs, sampling.logit_bias)
        request.emit(("prompt", scores, None))

    def _prefill_groups(self, started: list[_Running]) -> list[list[_Running]]:
        """Newly started sequences, grouped so each group's padded batch of uncached prompt tokens stays
        under PREFILL_TOKENS and every row's padded positions fit the context."""
        groups, current, longest, furthest = [], [], 0, 0
        for running in started:
            rest = len(running.request.prompt_ids) - running.cached
            longest_with, furthest_with = max(longest, rest), max(furthest, running.cached)
            if current and (
                longest_with * (len(current) + 1) > PREFILL_TOKENS or furthest_with + longest_with > self.context
            ):
                groups.append(current)
                current, longest_with, furthest_with = [], rest, running.cached
            current.append(running)
            longest, furthest = longest_with, furthest_with
        return groups + [current] if current else groups

    def _start(self, request: GenerationRequest) -> _Running:
        """Give an admitted request a slot (`_take_slot`) and its sampling state."""
        key = self.prefix_key(request)
        slot, cached = self._take_slot(key)
        seed = request.sampling.seed
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        stream = TextStream(self.tokenizer, request.sampling.stop)
        running = _Running(request, slot, stream, generator, cached=cached, prefix_key=key)
        running.seen.update(request.prompt_ids)
        self.running.append(running)
        return running

    def _take_slot(self, key: list) -> tuple[int, int]:
        """A free slot for a prompt (its `prefix_key`) and how many of its leading tokens that slot already
        holds: with prefix caching, the free slot holding the longest prefix of the prompt (or a copy of a
        longer one a running slot holds), else the least recently used free slot."""
        free = self.free_slots
        if not self.prefix_cache:
            self.slot_tokens[free[0]] = []
            return free.pop(0), 0
        # At most all but the last prompt token: it must run to give the first new token's logits.
        limit = len(key) - 1
        # free slots first, least recently used first: on a tie, those lose the least to take
        candidates = free + [running.slot for running in self.running]
        matched = [common_prefix_length(self.slot_tokens[slot], key, limit) for slot in candidates]
        best = max(range(len(candidates)), key=lambda index: (matched[index], -index))
        source, cached = candidates[best], matched[best]
        # Take the matching free slot itself unless that would evict more than it reuses; then copy
        # the prefix into the least recently used slot (a copy costs far less than a prefill).
        if source in free and 2 * cached >= len(self.slot_tokens[source]):
            slot = source
        else:
            slot = free[0]
            if cached and source != slot:
                self.cache.copy_prefix(source, slot, cached)
        free.remove(slot)
        self.slot_tokens[slot] = key[:cached]
        if cached:
            self.metrics["prefix_cache_hits_total"] += 1
            self.metrics["prefix_cache_reused_tokens_total"] += cached
        return slot, cached

    def _prefill(self, started: list[_Running]) -> None:
        """Run the uncached prompt tokens of newly started sequences in one batched pass (right-padded;
        each row writes its own slot from its first uncached position) and sample each one's first token."""
        rests = [running.request.prompt_ids[running.cached :] for running in started]
        slots = torch.tensor([running.slot for running in started], device=self.device)
        masks = TokenMasks(self.device)
        masks.start([running.request.matcher for running in started])
        starts = [running.cached for running in started]
        embeddings = [self._prompt_embeddings(running) for running in started]  # all None: text prompts
        logits = prefill(self.model, rests, self.cache, slots, starts=starts, embeddings=embeddings)
        logits = masks.apply(logits).float().cpu()
        self.metrics["prompt_tokens_total"] += sum(len(running.request.prompt_ids) for running in started)
        self.metrics["prefill_tokens_total"] += sum(len(rest) for rest in rests)
        for row, running in enumerate(started):
            self.slot_tokens[running.slot] = list(running.prefix_key)
            self._accept(running, logits[row])

    def _prompt_embeddings(self, running: _Running) -> torch.Tensor | None:
        """The input embeddings (uncached tokens, d_model) of a prompt with images: the vision-language model's
        image features at its image tokens, the tokens' own elsewhere; None for a prompt without images."""
        request = running.request
        if request.images is None:
            return None
        ids = torch.tensor([request.prompt_ids], device=self.device)
        return self.vision.input_embeddings(ids, request.images)[0, running.cached :]

    def _decode_step(self) -> None:
        rows = [running for running in self.running if not running.request.cancelled]
        for running in list(self.running):
            if running.request.cancelled:
                self._finish(running, "cancelled")
        if not rows:
            return
        tokens = torch.tensor([[running.generated[-1]] for running in rows], device=self.device)
        positions = [len(running.request.prompt_ids) + len(running.generated) - 1 for running in rows]
        positions = torch.tensor(positions, device=self.device)
        slots = torch.tensor([running.slot for running in rows], device=self.device)
        masks = TokenMasks(self.device)  # each constrained row's mask, while the model runs if it can
        masks.start([running.request.matcher for running in rows])
        logits = next_token_logits(self.model, tokens, self.cache, positions=positions, slots=slots)
        logits = masks.apply(logits).float().cpu()
        for index, running in enumerate(rows):
            self.slot_tokens[running.slot].append(running.generated[-1])  # its entries are written now
            self._accept(running, logits[index])

    def _accept(self, running: _Running, logits: torch.Tensor) -> None:
        """Sample this sequence's next token from its logits, stream it, and retire the sequence if done."""
        request = running.request
        logits = apply_logit_bias(logits, request.sampling.logit_bias)
        scored = logits  # what logprobs report: before the penalties below
        penalty = request.sampling.repetition_penalty
        if penalty != 1.0 and running.seen:  # as `generate` applies it: over the prompt and the reply so far
            logits = apply_repetition_penalty(logits[None], torch.tensor([sorted(running.seen)]), penalty)[0]
        if running.counts and (request.presence_penalty or request.frequency_penalty):
            # OpenAI's definition: subtract frequency * count + presence * [count > 0] for tokens generated so far.
            ids = torch.tensor(list(running.counts))
            counts = torch.tensor([running.counts[i] for i in running.counts], dtype=logits.dtype)
            logits = logits.clone()
            logits[ids] -= request.frequency_penalty * counts + request.presence_penalty
        token = int(pick_next_token(logits[None], request.sampling, running.generator)[0])
        running.generated.append(token)
        running.counts[token] += 1
        running.seen.add(token)
        self.metrics["completion_tokens_total"] += 1
        if request.matcher is not None:
            try:
                request.matcher.consume(token)
            except LmforgeError as error:  # llguidance hit one of its limits: this sequence fails, not the batch
                self._fail(running, str(error))
                return
        if token in request.stop_ids:
            self._finish(running, "stop")
            return
        if request.logprobs is not None:
            running.scores += score_tokens(scored[None], torch.tensor([token]), request.logprobs)
        piece = running.stream.push(token)
        if piece:
            request.emit(("text", piece, running.take_scores()))
        used = len(request.prompt_ids) + len(running.generated)
        if running.stream.stopped or (request.matcher is not None and request.matcher.complete):
            self._finish(running, "stop")
        elif len(running.generated) >= request.max_tokens or used >= self.context:
            self._finish(running, "length")

    def _finish(self, running: _Running, reason: str) -> None:
        if reason != "stop" or not running.stream.stopped:
            rest, scores = running.stream.flush(), running.take_scores()
            if (rest or scores) and reason != "cancelled":
                running.request.emit(("text", rest, scores))
        self.running.remove(running)
        self.free_slots.append(running.slot)
        self.metrics[f"finished_{reason}_total"] += 1
        running.request.emit(("done", reason, self._usage(running.request, len(running.generated))))

    def _fail(self, running: _Running, message: str) -> None:
        self.running.remove(running)
        self.free_slots.append(running.slot)
        self.metrics["generation_failures_total"] += 1
        running.request.emit(("error", message, None))

    @staticmethod
    def _usage(request: GenerationRequest, completion_tokens: int) -> dict:
        prompt = len(request.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }
