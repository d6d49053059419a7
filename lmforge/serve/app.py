"""The HTTP layer: OpenAI's /v1 routes, health, metrics and the chat page (FastAPI).

Requests become `GenerationRequest`s for the continuous-batching `Scheduler`, which runs the
model on its own thread; its events come back through an asyncio queue, streamed as
Server-Sent Events or gathered into one response. Every error has OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import struct
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse

from lmforge.apps.encoder import truncate_dimensions
from lmforge.errors import LmforgeError
from lmforge.formats.loading import SamplingDefaults, fallback_defaults
from lmforge.inference.chat import chat_stop_strings, chat_template, encode_chat, stop_token_ids
from lmforge.inference.generate import SamplingConfig, TokenScore, check_logit_bias
from lmforge.inference.tools import ToolCallReader, call_format, call_grammar, parse_reply
from lmforge.serve.errors import APIError, error_body, use_openai_errors
from lmforge.serve.images import ImageError, ImageLimits, request_images
from lmforge.serve.scheduler import GenerationRequest, QueueFull, Scheduler
from lmforge.serve.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    DetokenizeRequest,
    EmbeddingItem,
    EmbeddingList,
    EmbeddingRequest,
    FunctionCall,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    NamedToolChoice,
    ResponseMessage,
    SamplingDefaultsCard,
    TokenizeRequest,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from lmforge.tokenizer import token_bytes

PAGE = Path(__file__).with_name("page.html")


@dataclass
class ServeLimits:
    max_tokens: int = 4096  # per request; also capped by the context
    max_body_bytes: int = 1_000_000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_prompt_tokens_per_request: int = 16384  # prompt tokens over all of a request's sequences (prompts x n)
    max_embedding_tokens_per_request: int = 16384  # tokens over all inputs, after the model's truncation
    allow_special_tokens_in_prompts: bool = False  # /v1/completions: may "<|im_start|>" in a prompt be the token?
    retry_after_seconds: int = 1  # what a 429 (queue full) tells the client to wait
    images: ImageLimits = field(default_factory=ImageLimits)  # chat requests' image_url parts


DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streaming request checks that its client is still there


class BodyLimit:
    """Reject request bodies over `limit` bytes (413) before anything parses them.

    Pure ASGI: the body is read here, bounded, and replayed to the app; later `receive` calls
    go to the server, so streaming responses still see a client's disconnect.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_body(413, f"request body exceeds the limit of {self.limit} bytes", "invalid_request_error")
        await response(scope, receive, send)


class ApiKeyCheck:
    """Bearer-token check on /v1, /metrics and the tokenizer routes, compared in constant time."""

    GUARDED = ("/v1", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and path.startswith(self.GUARDED):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                message = "missing API key" if not header else "incorrect API key"
                response = error_body(401, f"{message}: send 'Authorization: Bearer <key>'", "authentication_error")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ErrorCount:
    """Count every error response (status >= 400) by status code, whoever sends it: the routes, the
    validation and HTTP handlers, and the body-limit and API-key checks in front of them."""

    def __init__(self, app, counts: collections.Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.counts[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counted)


@dataclass
class Submitted:
    """The sequences of one HTTP request, and the queue their scheduler events arrive on as (index, event)."""

    events: asyncio.Queue
    requests: list[GenerationRequest]
    # filled by `collect`, per sequence: its generated tokens' scores, and its prompt's (echo with logprobs)
    scores: list[list[TokenScore]] = field(init=False)
    prompt_scores: list[list[TokenScore]] = field(init=False)

    def __post_init__(self):
        self.scores = [[] for _ in self.requests]
        self.prompt_scores = [[] for _ in self.requests]

    def cancel(self) -> None:
        """Free their slots at the scheduler's next step (finished ones are already gone)."""
        for request in self.requests:
            request.cancelled = True


@dataclass
class ServedModels:
    """What the server offers: one chat/completions model (with its scheduler) and optionally an embedder."""

    name: str
    scheduler: Scheduler
    embedding_name: str | None = None
    embedder: object | None = None  # lmforge.apps.encoder.SentenceEmbedder
    created: int = field(default_factory=lambda: int(time.time()))
    sampling_defaults: SamplingDefaults | None = None  # default: lmforge's fallback for the model's kind

    def __post_init__(self):
        if self.sampling_defaults is None:
            self.sampling_defaults = fallback_defaults(self.scheduler.tokenizer)


class ServerState:
    """What the route handlers share: the served models, the limits, and the counters /metrics reports.
    One per app, in `app.state.server`; handlers receive it through `Depends(server_state)`."""

    def __init__(self, models: ServedModels, limits: ServeLimits):
        self.models, self.limits = models, limits
        self.scheduler = models.scheduler
        self.tokenizer = self.scheduler.tokenizer
        self.defaults = models.sampling_defaults.sampling
        self.stop_ids = frozenset(stop_token_ids(self.tokenizer))
        self.chat_stops = chat_stop_strings(self.tokenizer)  # a base model's plain template: its next user line
        self.started = time.monotonic()
        self.latency = {"count": 0, "sum": 0.0}
        self.error_responses: collections.Counter = collections.Counter()  # status code -> responses sent
        self.token_texts: dict[int, str] = {}  # token id -> its text, as logprobs show it
        self.byte_table: list[bytes] | None = (
            None  # token id -> its bytes (`tokenizer.token_bytes`), built at first use
        )

    def check_model(self, requested: str | None, kind: str) -> str:
        models = self.models
        served = models.name if kind == "chat" else models.embedding_name
        if kind == "embedding" and models.embedder is None:
            raise APIError(404, "this server has no embedding model (start it with --embedding-model)", param="model")
        if requested not in (None, "", served) and not (kind == "chat" and requested == "default"):
            raise APIError(
                404, f"model {requested!r} does not exist; this server serves {served!r}", "not_found_error", "model"
            )
        return served

    def sampling_for(self, body, max_tokens: int, index: int) -> SamplingConfig:
        """The request's settings; a field it leaves out takes the model's default."""

        def given(value, default):
            return default if value is None else value

        defaults = self.defaults
        seed = None if body.seed is None else (body.seed + index) % 2**63
        top_k = given(body.top_k, defaults.top_k)
        return SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=given(body.temperature, defaults.temperature),
            top_p=given(body.top_p, defaults.top_p),
            top_k=top_k if top_k is None or top_k > 0 else None,  # 0 and -1 turn it off
            repetition_penalty=given(body.repetition_penalty, defaults.repetition_penalty),
            stop=[*(body.stop or []), *self.chat_stops] if isinstance(body, ChatCompletionRequest) else body.stop,
            seed=seed,
            json_schema=self.response_schema(body),
            logit_bias=body.token_bias(),
        )

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name: the tokenizer's, within the model's (padded) embedding."""
        return min(self.tokenizer.vocab_size, self.scheduler.model.config.vocab_size)

    def check_token_ids(self, ids: list[int], field: str) -> None:
        for position, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise APIError(
                    400,
                    f"{field}[{position}]: token id {token} is outside the vocabulary (0 to {self.vocab_size - 1})",
                    param=field,
                )

    def token_text(self, token: int) -> str:
        """A token as text, as logprobs show it (a token that splits a UTF-8 character shows U+FFFD)."""
        text = self.token_texts.get(token)
        if text is None:
            text = self.token_texts[token] = self.tokenizer.decode([token])
        return text

    def token_bytes(self, token: int) -> list[int]:
        """A token's own bytes, as chat logprobs give them: part of a UTF-8 character where the token splits
        one, so that a reply's tokens' bytes join into its text (the text of such a token shows U+FFFD)."""
        if self.byte_table is None:
            try:
                self.byte_table = token_bytes(self.tokenizer)[0]
            except LmforgeError:  # a tokenizer whose pieces are not bytes: its decoded text stands in
                self.byte_table = []
        if token < len(self.byte_table):
            return list(self.byte_table[token])
        return list(self.token_text(token).encode("utf-8"))

    def chat_logprobs(self, scores: list[TokenScore]) -> ChoiceLogprobs:
        """Chat's `logprobs.content`: each token with its bytes and its most likely alternatives."""

        def entry(token: int, logprob: float) -> dict:
            return {"token": self.token_text(token), "logprob": logprob, "bytes": self.token_bytes(token)}

        return ChoiceLogprobs(
            content=[
                TokenLogprob(
                    **entry(score.token_id, score.logprob),
                    top_logprobs=[TopLogprob(**entry(token, logprob)) for token, logprob in score.top],
                )
                for score in scores
            ]
        )

    def completion_logprobs(
        self, scores: list[TokenScore], offset: int = 0, first_token: int | None = None
    ) -> CompletionLogprobs:
        """The legacy completions shape; `first_token`, an echoed prompt's first token, which has no score.
        `offset`: where the first token starts in the choice's text."""
        tokens, token_logprobs, top_logprobs = [], [], []
        if first_token is not None:
            tokens.append(self.token_text(first_token))
            token_logprobs.append(None)
            top_logprobs.append(None)
        for score in scores:
            tokens.append(self.token_text(score.token_id))
            token_logprobs.append(score.logprob)
            # OpenAI's: the most likely tokens, and the chosen one wherever it ranks
            best = {self.token_text(token): logprob for token, logprob in score.top}
            top_logprobs.append({**best, tokens[-1]: score.logprob})
        text_offset = []
        for token in tokens:
            text_offset.append(offset)
            offset += len(token)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=text_offset
        )

    @staticmethod
    def response_schema(body) -> dict | None:
        """The JSON Schema that response_format asks the reply to follow (None: free text); a 400 for a schema
        llguidance cannot compile, the one part of it pydantic cannot check."""
        schema = body.response_format.schema_for_decoding() if body.response_format else None
        if schema is not None:
            try:
                SamplingConfig(json_schema=schema)
            except ValueError as error:
                raise APIError(400, f"response_format: {error}", param="response_format") from None
        return schema

    def budget(self, prompt_ids: list[int], requested: int | None) -> int:
        context, limits = self.scheduler.context, self.limits
        if requested is not None and requested > limits.max_tokens:
            raise APIError(
                400, f"max_tokens is {requested}, above this server's limit of {limits.max_tokens}", param="max_tokens"
            )
        if requested is None:
            room = context - len(prompt_ids)
            if room < 1:
                raise APIError(
                    400, f"the prompt has {len(prompt_ids)} tokens; the context is {context} tokens", param="messages"
                )
            return min(room, limits.max_tokens, self.defaults.max_new_tokens)
        if len(prompt_ids) + requested > context:
            raise APIError(
                400,
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({requested}) is "
                f"{len(prompt_ids) + requested} tokens, beyond this model's context of {context} tokens",
                param="max_tokens",
            )
        return requested

    def check_work(self, prompts: list[list[int]], count: int) -> None:
        """Refuse a request whose sequences could never run together, or whose prompts are too much work."""
        sequences = len(prompts) * count
        if sequences > self.scheduler.max_batch:
            raise APIError(
                400,
                f"this request needs {sequences} sequences ({len(prompts)} prompt(s) x n={count}); this server "
                f"decodes at most {self.scheduler.max_batch} at once (--max-batch)",
                param="n",
            )
        prompt_tokens = sum(len(ids) for ids in prompts) * count
        if prompt_tokens > self.limits.max_prompt_tokens_per_request:
            raise APIError(
                400,
                f"this request has {prompt_tokens} prompt tokens (over all prompts x n={count}); the limit is "
                f"{self.limits.max_prompt_tokens_per_request} (--max-prompt-tokens-per-request)",
                param="prompt",
            )

    async def chat_images(self, body: ChatCompletionRequest, name: str) -> torch.Tensor | None:
        """A chat request's images, each checked against the limits, as the vision-language model's input
        (N, C, H, W); None without images, and a 400 when it has some and the served model cannot read them."""
        if not any(message.has_images() for message in body.messages):
            return None
        if self.scheduler.vision is None:
            raise APIError(
                400,
                f"the request has image_url parts, but this server's model {name!r} is a text-only language model "
                "and cannot read images; serve a vision-language model (a folder from `lmforge finetune --task "
                "vision-chat`) to send images",
                param="messages",
            )
        vision, limits = self.scheduler.vision, self.limits.images

        def read() -> torch.Tensor:
            return torch.stack([vision.preprocess_image(image) for image in request_images(body.messages, limits)])

        try:  # off the event loop: decoding an image takes milliseconds
            return await asyncio.to_thread(read)
        except ImageError as error:
            raise APIError(400, str(error), param=error.field) from None

    def encode_chat(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """A chat's prompt ids; a vision-language model's with each image part's run of image tokens (and its
        default system prompt where the chat has none, as it was trained and `lmforge chat` runs it)."""
        if self.scheduler.vision is None:
            return encode_chat(self.tokenizer, messages, True, tools)
        from lmforge.apps.vlm import vision_prompt_ids

        return vision_prompt_ids(self.scheduler.vision, self.tokenizer, messages, True, tools)[0]

    def encode_prompt(self, prompt: str) -> list[int]:
        if self.limits.allow_special_tokens_in_prompts:
            ids = self.tokenizer.encode_with_special_tokens(prompt)
        else:
            ids = self.tokenizer.encode(prompt)
        return self.tokenizer.with_document_marks(ids) if ids else ids

    async def run(
        self,
        prompts: list[tuple[list[int], int]],
        body,
        count: int,
        grammar: str | None = None,
        images: torch.Tensor | None = None,
    ) -> Submitted:
        """Submit `count` sequences per (prompt ids, max_tokens), all or none; their events arrive on
        one queue as (index, event), index = prompt number * count + choice. A `grammar` (a forced
        tool call) constrains every sequence; `images` (a chat's, `chat_images`) go with every sequence."""
        try:
            check_logit_bias(body.token_bias(), self.vocab_size)
        except LmforgeError as error:
            raise APIError(400, str(error), param="logit_bias") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = []
        for prompt_index, (prompt_ids, max_tokens) in enumerate(prompts):
            for choice in range(count):
                index = prompt_index * count + choice
                sampling = self.sampling_for(body, max_tokens, choice)
                if grammar is not None:
                    sampling = replace(sampling, grammar=grammar)
                requests.append(
                    GenerationRequest(
                        prompt_ids=prompt_ids,
                        max_tokens=max_tokens,
                        emit=lambda event, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, event)),
                        sampling=sampling,
                        presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty,
                        stop_ids=self.stop_ids,
                        logprobs=body.generated_scores(),
                        prompt_logprobs=body.prompt_scores(),
                        images=images,
                    )
                )
        try:
            if any(request.sampling.json_schema or request.sampling.grammar for request in requests):
                # building their grammar matchers takes milliseconds (the first for a tokenizer ~0.3 s): not here
                await asyncio.to_thread(self.scheduler.submit_all, requests)
            else:
                self.scheduler.submit_all(requests)
        except ValueError as error:
            raise APIError(400, str(error), param="max_tokens") from None
        except LmforgeError as error:  # a grammar this model's tokenizer cannot drive
            raise APIError(400, str(error), param="response_format" if body.response_format else None) from None
        except QueueFull as error:
            raise APIError(
                429, str(error), "rate_limit_error", headers={"Retry-After": str(self.limits.retry_after_seconds)}
            ) from None
        except RuntimeError as error:
            raise APIError(503, str(error), "server_error") from None
        return Submitted(events, requests)

    def record(self, start: float) -> None:
        self.latency["count"] += 1
        self.latency["sum"] += time.monotonic() - start


def server_state(request: Request) -> ServerState:
    """The dependency every route handler takes: its app's `ServerState`."""
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]


async def collect(submitted: Submitted, choices: int, http_request: Request) -> tuple[list[str], list[str], dict]:
    """Gather every sequence's text; a client that leaves cancels them (checked every DISCONNECT_POLL_SECONDS)."""
    count = len(submitted.requests)
    texts, reasons = [""] * count, [None] * count
    # as OpenAI counts: each prompt once, however many choices it has
    prompt_tokens = sum(len(request.prompt_ids) for request in submitted.requests[::choices])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
    remaining = count
    checked = time.monotonic()
    try:
        while remaining:
            if time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:
                if await http_request.is_disconnected():
                    raise APIError(499, "the client disconnected")
                checked = time.monotonic()
            try:
                index, (kind, value, extra) = await asyncio.wait_for(submitted.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                continue
            if kind == "text":
                texts[index] += value
                submitted.scores[index] += extra
            elif kind == "prompt":
                submitted.prompt_scores[index] = value
            elif kind == "error":
                raise APIError(500, value, "server_error")
            else:
                reasons[index] = value
                usage["completion_tokens"] += extra["completion_tokens"]
                remaining -= 1
    finally:  # on an error or a disconnect, the other sequences stop at the next step
        submitted.cancel()
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return texts, reasons, usage


def sse(payload) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


async def stream(server: ServerState, submitted: Submitted, count: int, make_chunk, include_usage: bool, start: float):
    events = submitted.events
    remaining = count
    completion_tokens, prompt_tokens = 0, 0
    try:
        for index in range(count):
            first = make_chunk(index, None, None, role=True)
            if first is not None:
                yield sse(first)
        while remaining:
            index, (kind, value, extra) = await events.get()
            if kind == "text":
                for chunk in as_chunks(make_chunk(index, value, None, scores=extra)):
                    yield sse(chunk)
            elif kind == "prompt":  # a completion's echoed prompt, scored
                yield sse(make_chunk(index, None, None, prompt_scores=value))
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                remaining -= 1
            else:
                for chunk in as_chunks(make_chunk(index, None, value)):
                    yield sse(chunk)
                prompt_tokens = extra["prompt_tokens"]
                completion_tokens += extra["completion_tokens"]
                remaining -= 1
        if include_usage:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            yield sse(make_chunk(None, None, None, usage=usage))
        yield "data: [DONE]\n\n"
        server.record(start)
    finally:  # the client went away (or we finished): free the slots now, not at max_tokens
        submitted.cancel()


def as_chunks(made) -> list:
    """What a route's chunk maker returned for one event: one chunk, or several (a reply's tool calls)."""
    return made if isinstance(made, list) else [made]


def streaming_response(generator) -> StreamingResponse:
    return StreamingResponse(
        generator, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


routes = APIRouter()


@dataclass
class ToolUse:
    """How a chat request uses tools: the definitions its template is given, the functions whose calls
    are read from the reply (none: the reply is all content), and the grammar the reply is decoded under
    (None: the model's own text)."""

    definitions: list[dict] | None = None
    names: set[str] = field(default_factory=set)
    grammar: str | None = None


def tool_use(body: ChatCompletionRequest, template: str) -> ToolUse:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a request. "none" offers no tools (and reads
    no calls); "auto" offers them and reads any call the reply makes; "required" and a named function
    force the reply to be calls (to that function). Forced calls are decoded under `call_grammar`, their
    arguments valid under their schemas; so are "auto" replies where a function is `strict` or parallel
    calls are off (the reply may then be text, or calls that are valid, at most one without parallel)."""
    tools, choice = body.tools or [], body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if (choice == "required" or named) and not tools:
        raise APIError(400, "tool_choice requires a call, but the request has no tools", param="tool_choice")
    names = [tool.function.name for tool in tools]
    if len(set(names)) < len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise APIError(400, f"tools: each function needs its own name; repeated: {duplicated}", param="tools")
    if named and named not in names:
        raise APIError(
            400,
            f"tool_choice names the function {named!r}, which is not in tools ({', '.join(names)})",
            param="tool_choice",
        )
    if not tools or choice == "none":
        return ToolUse()
    definitions = [tool.model_dump(exclude_none=True) for tool in tools]
    text_allowed = choice in (None, "auto")
    if text_allowed and body.parallel_tool_calls and not any(tool.function.strict for tool in tools):
        return ToolUse(definitions, set(names))
    if body.response_format is not None and body.response_format.schema_for_decoding() is not None:
        raise APIError(
            400,
            "response_format would constrain the reply that tools constrain here (tool_choice "
            f"{named or choice or 'auto'!r}, strict functions or parallel_tool_calls false); use one of them",
            param="response_format",
        )
    constrained = {}
    for index, tool in enumerate(tools):
        if named in (None, tool.function.name):
            constrained[tool.function.name] = parameters = tool.function.parameters
            try:  # a schema llguidance cannot compile is the client's to fix
                SamplingConfig(json_schema=parameters or {"type": "object"})
            except ValueError as error:
                param = f"tools.{index}.function.parameters"
                raise APIError(400, f"{param}: {error}", param=param) from None
    parallel = body.parallel_tool_calls and not named
    grammar = call_grammar(constrained, call_format(template), parallel, text_allowed)
    return ToolUse(definitions, set(constrained), grammar)


def template_messages(messages: list) -> list[dict]:
    """The request's messages as chat templates take them (OpenAI's "developer" is a system message); a message
    with images keeps its parts, each image a `{"type": "image"}` placeholder (the images go alongside)."""
    written = []
    for index, message in enumerate(messages):
        if message.tool_calls and message.role != "assistant":
            raise APIError(400, "only assistant messages carry tool_calls", param=f"messages.{index}.tool_calls")
        content = None if message.content is None and message.tool_calls else message.text()
        if message.has_images():
            content = [
                {"type": "text", "text": part.text} if part.type == "text" else {"type": "image"}
                for part in message.content
            ]
        item = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.tool_calls:
            item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        written.append(item)
    return written


def reply_message(text: str, reason: str, use: ToolUse) -> tuple[ResponseMessage, str]:
    """A finished reply as OpenAI's message and finish_reason: its calls read out where tools were offered."""
    if not use.names:
        return ResponseMessage(content=text), reason
    parsed = parse_reply(text, use.names)
    calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.tool_calls]
    finish = "tool_calls" if calls and reason == "stop" else reason
    return ResponseMessage(content=parsed.content, tool_calls=calls or None), finish


def tool_call_deltas(position: int, call) -> list[Delta]:
    """One streamed call as OpenAI streams it: its id, type and name first, then its arguments."""
    opening = ToolCallDelta(
        index=position, id=call.id, type="function", function=FunctionCallDelta(name=call.name, arguments="")
    )
    arguments = ToolCallDelta(index=position, function=FunctionCallDelta(arguments=call.arguments))
    return [Delta(tool_calls=[opening]), Delta(tool_calls=[arguments])]


@routes.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http_request: Request, server: Server):
    start = time.monotonic()
    name = server.check_model(body.model, "chat")
    images = await server.chat_images(body, name)
    messages = template_messages(body.messages)
    use = tool_use(body, chat_template(server.tokenizer))
    try:  # off the event loop: a model's template may take up to its render limit
        prompt_ids = await asyncio.to_thread(server.encode_chat, messages, use.definitions)
    except LmforgeError as error:
        raise APIError(400, str(error), param="tools" if str(error).startswith("tools") else "messages") from None
    server.check_work([prompt_ids], body.n)
    max_tokens = server.budget(prompt_ids, body.max_completion_tokens or body.max_tokens)
    submitted = await server.run([(prompt_ids, max_tokens)], body, body.n, grammar=use.grammar, images=images)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        readers = [ToolCallReader(use.names) for _ in range(body.n)] if use.names else None

        def made(index, delta, finish=None, usage=None, logprobs=None):
            choices = []
            if index is not None:
                choices = [ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)]
            return ChatCompletionChunk(id=response_id, created=created, model=name, choices=choices, usage=usage)

        def chunk(index, text, finish, role=False, usage=None, scores=None):
            logprobs = server.chat_logprobs(scores) if body.logprobs and text is not None and scores else None
            if readers is None or role or index is None:
                return made(index, Delta(role="assistant" if role else None, content=text), finish, usage, logprobs)
            # tools offered: the text goes through the reader, which holds back what may be a call
            reader = readers[index]
            deltas = []
            for piece in reader.push(text) if finish is None else reader.finish():
                if piece.call is None:
                    deltas.append(Delta(content=piece.content))
                else:
                    deltas += tool_call_deltas(reader.calls.index(piece.call), piece.call)
            if logprobs is not None and not deltas:  # text held back: its tokens' scores still go out now
                deltas.append(Delta())
            chunks = [made(index, delta, logprobs=logprobs if i == 0 else None) for i, delta in enumerate(deltas)]
            if finish is not None:
                chunks.append(made(index, Delta(), "tool_calls" if reader.calls and finish == "stop" else finish))
            return chunks

        return streaming_response(stream(server, submitted, body.n, chunk, include_usage, start))
    texts, reasons, usage = await collect(submitted, body.n, http_request)
    server.record(start)
    choices = []
    for index, (text, reason) in enumerate(zip(texts, reasons)):
        message, finish = reply_message(text, reason, use)
        logprobs = server.chat_logprobs(submitted.scores[index]) if body.logprobs else None
        choices.append(ChatChoice(index=index, message=message, finish_reason=finish, logprobs=logprobs))
    return ChatCompletion(id=response_id, created=created, model=name, choices=choices, usage=Usage(**usage))


@routes.post("/v1/completions")
async def completions(body: CompletionRequest, http_request: Request, server: Server):
    start = time.monotonic()
    name = server.check_model(body.model, "chat")
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise APIError(400, "stream=true takes a single prompt", param="prompt")
    encoded = []
    for number, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = server.encode_prompt(prompt)
        else:  # token ids, taken as they are
            ids = list(prompt)
            server.check_token_ids(ids, "prompt" if len(prompts) == 1 else f"prompt[{number}]")
        if not ids:
            if server.tokenizer.bos_id is None:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = [server.tokenizer.bos_id]
        encoded.append(ids)
    server.check_work(encoded, body.n)
    submitted = await server.run([(ids, server.budget(ids, body.max_tokens)) for ids in encoded], body, body.n)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        text_offset = [0] * body.n  # where each choice's next piece starts in its text

        def chunk(index, text, finish, role=False, usage=None, scores=None, prompt_scores=None):
            if role or prompt_scores is not None:  # the echoed prompt: first, or with its scores once scored
                if not body.echo or (role and body.logprobs is not None):
                    return None
                prompt_ids = submitted.requests[index].prompt_ids
                echoed = server.tokenizer.decode(prompt_ids)
                logprobs = None
                if prompt_scores is not None:
                    logprobs = server.completion_logprobs(prompt_scores, first_token=prompt_ids[0])
                text_offset[index] = len(echoed)
                choices = [CompletionChoice(index=index, text=echoed, logprobs=logprobs)]
                return Completion(id=response_id, created=created, model=name, choices=choices)
            logprobs = None
            if body.logprobs is not None and text is not None:
                logprobs = server.completion_logprobs(scores, text_offset[index])
                text_offset[index] += len(text)
            choices = []
            if index is not None:
                choices = [CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=logprobs)]
            return Completion(id=response_id, created=created, model=name, choices=choices, usage=usage)

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return streaming_response(stream(server, submitted, body.n, chunk, include_usage, start))
    texts, reasons, usage = await collect(submitted, body.n, http_request)
    server.record(start)
    choices = []
    for index, (text, reason) in enumerate(zip(texts, reasons)):
        prompt_ids = submitted.requests[index].prompt_ids
        echoed = server.tokenizer.decode(prompt_ids) if body.echo else ""  # the prompt as the model read it
        logprobs = None
        if body.logprobs is not None:
            scores = submitted.scores[index]
            if body.echo:
                scores = submitted.prompt_scores[index] + scores
            logprobs = server.completion_logprobs(scores, first_token=prompt_ids[0] if body.echo else None)
        choices.append(CompletionChoice(index=index, text=echoed + text, finish_reason=reason, logprobs=logprobs))
    return Completion(id=response_id, created=created, model=name, choices=choices, usage=Usage(**usage))


def embedding_sequences(body: EmbeddingRequest, embedder, name: str) -> list[list[int]]:
    """What the encoder reads for the request's inputs: texts tokenized, or token ids checked against the
    vocabulary and framed as text is ([CLS] ids [SEP], truncated alike), so ids embed as their text does."""
    texts_ids = body.token_ids()
    if texts_ids is None:
        return embedder.tokenize(body.texts())
    one_text = isinstance(body.input[0], int)
    for text_index, ids in enumerate(texts_ids):
        if min(ids) < 0 or max(ids) >= embedder.vocab_size:
            position = next(i for i, token in enumerate(ids) if not 0 <= token < embedder.vocab_size)
            where = f"input.{position}" if one_text else f"input.{text_index}.{position}"
            raise APIError(
                400,
                f"{where}: token id {ids[position]} is not in {name}'s vocabulary (0 to {embedder.vocab_size - 1}); "
                "token-id inputs are ids of the embedding model's own tokenizer, not tiktoken's",
                param=where,
            )
    return embedder.frame_token_ids(texts_ids)


@routes.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, server: Server):
    name = server.check_model(body.model, "embedding")
    embedder, limits = server.models.embedder, server.limits
    if body.dimensions is not None and body.dimensions > embedder.dimensions:
        raise APIError(
            400, f"dimensions is {body.dimensions}; {name} has {embedder.dimensions} at most", param="dimensions"
        )
    sequences = embedding_sequences(body, embedder, name)
    token_count = sum(len(ids) for ids in sequences)
    if token_count > limits.max_embedding_tokens_per_request:
        raise APIError(
            400,
            f"the inputs have {token_count} tokens (after truncation to the model's "
            f"{embedder.max_tokens} per input); the limit is {limits.max_embedding_tokens_per_request} "
            "per request (--max-embedding-tokens-per-request)",
            param="input",
        )
    vectors = await asyncio.to_thread(embedder.embed_tokens, sequences)
    if body.dimensions is not None:
        vectors = truncate_dimensions(vectors, body.dimensions)
    data = []
    for index, vector in enumerate(vectors.tolist()):
        if body.encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append(EmbeddingItem(index=index, embedding=encoded))
        else:
            data.append(EmbeddingItem(index=index, embedding=vector))
    return EmbeddingList(data=data, model=name, usage=Usage(prompt_tokens=token_count, total_tokens=token_count))


def model_cards(server: ServerState) -> list[ModelCard]:
    models, defaults, context = server.models, server.defaults, server.scheduler.context
    sampling = SamplingDefaultsCard(
        temperature=defaults.temperature,
        top_p=defaults.top_p,
        top_k=defaults.top_k,
        repetition_penalty=defaults.repetition_penalty,
        max_tokens=min(defaults.max_new_tokens, server.limits.max_tokens, context - 1),
        source=models.sampling_defaults.source,
    )
    cards = [
        ModelCard(
            id=models.name,
            created=models.created,
            capabilities=["chat", "completions", *(["vision"] if server.scheduler.vision is not None else [])],
            context_tokens=context,
            sampling_defaults=sampling,
        )
    ]
    if models.embedder is not None:
        cards.append(
            ModelCard(
                id=models.embedding_name,
                created=models.created,
                capabilities=["embeddings"],
                context_tokens=models.embedder.max_tokens,
            )
        )
    return cards


@routes.get("/v1/models")
async def list_models(server: Server):
    return ModelList(data=model_cards(server))


@routes.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, server: Server):
    cards = model_cards(server)
    card = next((card for card in cards if card.id == model_id), None)
    if card is None:
        served = ", ".join(repr(card.id) for card in cards)
        raise APIError(
            404, f"model {model_id!r} does not exist; this server serves {served}", "not_found_error", "model"
        )
    return card


# vLLM's tokenizer routes, at the root as vLLM has them: lm-evaluation-harness's `local-completions` finds them and
# tokenizes through the server (its `tokenizer_backend=remote`), so scoring needs no tokenizer download.
@routes.post("/tokenize")
async def tokenize(body: TokenizeRequest, server: Server):
    server.check_model(body.model, "chat")
    tokenizer = server.tokenizer
    # special-token strings are their tokens here, as in a transformers tokenizer: a client that sends the ids
    # back can as well send them directly
    ids = tokenizer.encode_with_special_tokens(body.prompt)
    if body.add_special_tokens:
        ids = tokenizer.with_document_marks(ids)
    return {"count": len(ids), "max_model_len": server.scheduler.context, "tokens": ids}


@routes.post("/detokenize")
async def detokenize(body: DetokenizeRequest, server: Server):
    server.check_model(body.model, "chat")
    server.check_token_ids(body.tokens, "tokens")
    return {"prompt": server.tokenizer.decode(body.tokens)}


@routes.get("/tokenizer_info")
async def tokenizer_info(server: Server):
    tokenizer = server.tokenizer
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token if tokenizer.bos_id is not None else None,
        "eos_token": tokenizer.eos_token if tokenizer.eos_id is not None else None,
        "pad_token": tokenizer.pad_token if tokenizer.pad_id is not None else None,
        "chat_template": tokenizer.chat_template,
        "model_max_length": server.scheduler.context,
    }


@routes.get("/health")
async def health(server: Server):
    scheduler, limits = server.scheduler, server.limits
    return {
        "status": "ok" if scheduler.thread.is_alive() and scheduler.accepting else "unavailable",
        "model": server.models.name,
        "uptime_seconds": round(time.monotonic() - server.started, 1),
        "limits": {
            "max_batch": scheduler.max_batch,
            "max_queue": scheduler.max_queue,
            "context_tokens": scheduler.context,
            "max_tokens": limits.max_tokens,
            "max_prompt_tokens_per_request": limits.max_prompt_tokens_per_request,
            "max_embedding_tokens_per_request": limits.max_embedding_tokens_per_request,
            **(asdict(limits.images) if scheduler.vision is not None else {}),
        },
    }


@routes.get("/metrics")
async def metrics(server: Server):
    scheduler, latency = server.scheduler, server.latency
    counters = scheduler.metrics
    lines = [
        "# TYPE lmforge_requests_total counter",
        f"lmforge_requests_total {counters['requests_total']}",
        "# TYPE lmforge_prompt_tokens_total counter",
        f"lmforge_prompt_tokens_total {counters['prompt_tokens_total']}",
        "# TYPE lmforge_prefill_tokens_total counter",  # prompt tokens run through the model: not from the cache
        f"lmforge_prefill_tokens_total {counters['prefill_tokens_total']}",
        "# TYPE lmforge_prefix_cache_hits_total counter",
        f"lmforge_prefix_cache_hits_total {counters['prefix_cache_hits_total']}",
        "# TYPE lmforge_prefix_cache_reused_tokens_total counter",
        f"lmforge_prefix_cache_reused_tokens_total {counters['prefix_cache_reused_tokens_total']}",
        "# TYPE lmforge_completion_tokens_total counter",
        f"lmforge_completion_tokens_total {counters['completion_tokens_total']}",
        "# TYPE lmforge_errors_total counter",
        *(
            f'lmforge_errors_total{{status="{status}"}} {count}'
            for status, count in sorted(server.error_responses.items())
        ),
        "# TYPE lmforge_generation_failures_total counter",
        f"lmforge_generation_failures_total {counters['generation_failures_total']}",
        "# TYPE lmforge_rejected_queue_full_total counter",
        f"lmforge_rejected_queue_full_total {counters['rejected_queue_full_total']}",
        "# TYPE lmforge_queue_depth gauge",
        f"lmforge_queue_depth {scheduler.queue_depth()}",
        "# TYPE lmforge_running_sequences gauge",
        f"lmforge_running_sequences {scheduler.active_sequences()}",
        "# TYPE lmforge_request_latency_seconds summary",
        f"lmforge_request_latency_seconds_count {latency['count']}",
        f"lmforge_request_latency_seconds_sum {latency['sum']:.6f}",
    ]
    for reason in ("stop", "length", "cancelled"):
        lines.append(f'lmforge_finished_total{{reason="{reason}"}} {counters[f"finished_{reason}_total"]}')
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


@routes.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def create_app(models: ServedModels, limits: ServeLimits | None = None, drain_seconds: float = 10.0) -> FastAPI:
    """The server: `routes` over one `ServerState`, behind the body-limit, API-key, CORS and error-count layers."""
    server = ServerState(models, limits or ServeLimits())
    scheduler = models.scheduler

    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.shutdown, drain_seconds)

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.state.scheduler = scheduler
    app.state.sampling_defaults = models.sampling_defaults
    limits = server.limits
    if limits.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=limits.cors_origins, allow_methods=["*"], allow_headers=["*"])
    if limits.api_key:
        app.add_middleware(ApiKeyCheck, key=limits.api_key)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    # added last: outermost, so it sees every response
    app.add_middleware(ErrorCount, counts=server.error_responses)
    use_openai_errors(app)
    app.include_router(routes)
    return app
