"""The HTTP layer: OpenAI's /v1 routes, health, metrics and the chat page (FastAPI).

Requests become `GenerationRequest`s for the continuous-batching `Scheduler`, which runs the
model on its own thread; its events come back through an asyncio queue, streamed as
Server-Sent Events or gathered into one response. Every error has OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.chat import render_chat, stop_token_ids
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingConfig
from lmforge.serve.scheduler import GenerationRequest, Scheduler
from lmforge.serve.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    EmbeddingItem,
    EmbeddingList,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
)

PAGE = Path(__file__).with_name("page.html")


@dataclass
class ServeLimits:
    max_tokens: int = 4096  # per request; also capped by the context
    max_body_bytes: int = 1_000_000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limited"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


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
    """Bearer-token check on /v1 and /metrics, compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and path.startswith(("/v1", "/metrics")):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                message = "missing API key" if not header else "incorrect API key"
                response = error_body(401, f"{message}: send 'Authorization: Bearer <key>'", "authentication_error")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


@dataclass
class Submitted:
    """The sequences of one HTTP request, and the queue their scheduler events arrive on as (index, event)."""

    events: asyncio.Queue
    requests: list[GenerationRequest]

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
    embedder: object | None = None  # lmforge.encoder.SentenceEmbedder
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(models: ServedModels, limits: ServeLimits | None = None) -> FastAPI:
    limits = limits or ServeLimits()
    scheduler = models.scheduler
    tokenizer = scheduler.tokenizer
    started = time.monotonic()
    latency = {"count": 0, "sum": 0.0}
    stop_ids = frozenset(stop_token_ids(tokenizer))

    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.shutdown, getattr(scheduler, "drain_seconds", 10.0))

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    if limits.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=limits.cors_origins, allow_methods=["*"], allow_headers=["*"])
    if limits.api_key:
        app.add_middleware(ApiKeyCheck, key=limits.api_key)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error_body(error.status, error.message, error.kind, error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return error_body(400, f"request body is not valid JSON: {first.get('msg', '')}", "invalid_request_error")
        location = ".".join(str(part) for part in first.get("loc", ())[1:])
        detail = "; ".join(
            f"{'.'.join(str(p) for p in problem.get('loc', ())[1:]) or 'body'}: {problem.get('msg')}"
            for problem in problems[:5]
        )
        return error_body(400, f"invalid request: {detail}", "invalid_request_error", location or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return error_body(error.status_code, str(error.detail), "invalid_request_error")

    def check_model(requested: str | None, kind: str) -> str:
        served = models.name if kind == "chat" else models.embedding_name
        if kind == "embedding" and models.embedder is None:
            raise APIError(404, "this server has no embedding model (start it with --embedding-model)", param="model")
        if requested not in (None, "", served) and not (kind == "chat" and requested == "default"):
            raise APIError(
                404, f"model {requested!r} does not exist; this server serves {served!r}", "not_found_error", "model"
            )
        return served

    def sampling_for(body, max_tokens: int, index: int) -> SamplingConfig:
        seed = None if body.seed is None else (body.seed + index) % 2**63
        return SamplingConfig(
            max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=seed
        )

    def budget(prompt_ids: list[int], requested: int | None) -> int:
        context = scheduler.context
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
            return min(room, limits.max_tokens)
        if len(prompt_ids) + requested > context:
            raise APIError(
                400,
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({requested}) is "
                f"{len(prompt_ids) + requested} tokens, beyond this model's context of {context} tokens",
                param="max_tokens",
            )
        return requested

    async def run(prompt_ids: list[int], body, max_tokens: int, count: int) -> Submitted:
        """Submit `count` sequences; their events arrive on one queue as (index, event)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = []
        for index in range(count):
            request = GenerationRequest(
                prompt_ids=prompt_ids,
                max_tokens=max_tokens,
                emit=lambda event, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, event)),
                sampling=sampling_for(body, max_tokens, index),
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                stop_ids=stop_ids,
            )
            try:
                scheduler.submit(request)
            except ValueError as error:
                raise APIError(400, str(error), param="max_tokens") from None
            except RuntimeError as error:
                raise APIError(503, str(error), "server_error") from None
            requests.append(request)
        return Submitted(events, requests)

    async def collect(submitted: Submitted, count: int) -> tuple[list[str], list[str], dict]:
        events = submitted.events
        texts, reasons = [""] * count, [None] * count
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        remaining = count
        try:
            while remaining:
                index, (kind, value, extra) = await events.get()
                if kind == "text":
                    texts[index] += value
                elif kind == "error":
                    raise APIError(500, value, "server_error")
                else:
                    reasons[index] = value
                    usage["prompt_tokens"] = extra["prompt_tokens"]
                    usage["completion_tokens"] += extra["completion_tokens"]
                    remaining -= 1
        except asyncio.CancelledError:
            submitted.cancel()
            raise
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return texts, reasons, usage

    def record(start: float) -> None:
        latency["count"] += 1
        latency["sum"] += time.monotonic() - start

    def sse(payload) -> str:
        return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"

    async def stream(submitted: Submitted, count: int, make_chunk, include_usage: bool, start: float):
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
                    yield sse(make_chunk(index, value, None))
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                    remaining -= 1
                else:
                    yield sse(make_chunk(index, None, value))
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
            record(start)
        finally:  # the client went away (or we finished): free the slots now, not at max_tokens
            submitted.cancel()

    def streaming_response(generator) -> StreamingResponse:
        return StreamingResponse(
            generator, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        start = time.monotonic()
        name = check_model(body.model, "chat")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = render_chat(messages, tokenizer.chat_template)
        except LmforgeError as error:
            raise APIError(400, str(error), param="messages") from None
        prompt_ids = tokenizer.encode(prompt)
        max_tokens = budget(prompt_ids, body.max_completion_tokens or body.max_tokens)
        events = await run(prompt_ids, body, max_tokens, body.n)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(index, text, finish, role=False, usage=None):
                delta = Delta(role="assistant" if role else None, content=text)
                choices = [] if index is None else [ChatChunkChoice(index=index, delta=delta, finish_reason=finish)]
                return ChatCompletionChunk(id=response_id, created=created, model=name, choices=choices, usage=usage)

            return streaming_response(stream(events, body.n, chunk, include_usage, start))
        texts, reasons, usage = await collect(events, body.n)
        record(start)
        choices = [
            ChatChoice(index=i, message=ResponseMessage(content=text), finish_reason=reason)
            for i, (text, reason) in enumerate(zip(texts, reasons))
        ]
        return ChatCompletion(id=response_id, created=created, model=name, choices=choices, usage=Usage(**usage))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        start = time.monotonic()
        name = check_model(body.model, "chat")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) > 1:
            raise APIError(400, "stream=true takes a single prompt", param="prompt")
        encoded = []
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            if not ids:
                if tokenizer.bos_id is None:
                    raise APIError(400, "the prompt is empty", param="prompt")
                ids = [tokenizer.bos_id]
            encoded.append((ids, budget(ids, body.max_tokens)))
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            events = await run(encoded[0][0], body, encoded[0][1], body.n)

            def chunk(index, text, finish, role=False, usage=None):
                if role:
                    return None
                choices = (
                    [] if index is None else [CompletionChoice(index=index, text=text or "", finish_reason=finish)]
                )
                return Completion(id=response_id, created=created, model=name, choices=choices, usage=usage)

            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return streaming_response(stream(events, body.n, chunk, include_usage, start))
        runs = [await run(ids, body, max_tokens, body.n) for ids, max_tokens in encoded]
        results = await asyncio.gather(*(collect(submitted, body.n) for submitted in runs))
        record(start)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for texts, reasons, run_usage in results:
            for text, reason in zip(texts, reasons):
                choices.append(CompletionChoice(index=len(choices), text=text, finish_reason=reason))
            for key in usage:
                usage[key] += run_usage[key]
        return Completion(id=response_id, created=created, model=name, choices=choices, usage=Usage(**usage))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        name = check_model(body.model, "embedding")
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors, token_count = await asyncio.to_thread(models.embedder.embed_with_counts, texts)
        data = []
        for index, vector in enumerate(vectors.tolist()):
            if body.encoding_format == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append(EmbeddingItem(index=index, embedding=encoded))
            else:
                data.append(EmbeddingItem(index=index, embedding=vector))
        return EmbeddingList(data=data, model=name, usage=Usage(prompt_tokens=token_count, total_tokens=token_count))

    @app.get("/v1/models")
    async def list_models():
        cards = [ModelCard(id=models.name, created=models.created)]
        if models.embedder is not None:
            cards.append(ModelCard(id=models.embedding_name, created=models.created))
        return ModelList(data=cards)

    @app.get("/health")
    async def health():
        return {
            "status": "ok" if scheduler.thread.is_alive() and scheduler.accepting else "unavailable",
            "model": models.name,
            "uptime_seconds": round(time.monotonic() - started, 1),
        }

    @app.get("/metrics")
    async def metrics():
        counters = scheduler.metrics
        lines = [
            "# TYPE lmforge_requests_total counter",
            f"lmforge_requests_total {counters['requests_total']}",
            "# TYPE lmforge_prompt_tokens_total counter",
            f"lmforge_prompt_tokens_total {counters['prompt_tokens_total']}",
            "# TYPE lmforge_completion_tokens_total counter",
            f"lmforge_completion_tokens_total {counters['completion_tokens_total']}",
            "# TYPE lmforge_errors_total counter",
            f"lmforge_errors_total {counters['errors_total']}",
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

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app
