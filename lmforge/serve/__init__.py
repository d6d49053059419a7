"""`lmforge serve`: any lmforge model behind an OpenAI-compatible HTTP API, with a chat page."""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError


@dataclass
class ServeConfig:
    """What `lmforge serve` serves and how."""

    model: str = "smollm2-135m-instruct"  # name, .gguf, HF folder or checkpoint
    model_name: str | None = None  # the id clients send; default: the model argument
    # Q4/Q8 GGUF weights stay quantised: fastest for one client. fp32 weights read 4-8x more bytes
    # per step but batch better (decoding one sequence is memory-bound in fp32, compute-bound in int4).
    keep_quantized: bool = True
    adapter: str | None = None  # a LoRA adapter folder to apply to the model
    embedding_model: str = "all-minilm-l6-v2"  # "none" to serve no /v1/embeddings
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # default: $LMFORGE_API_KEY; unset means no key required
    max_batch: int = 8  # sequences decoded together (KV-cache slots); also the most one request may ask for
    max_queue: int = 64  # sequences waiting for a slot; beyond it, 429 with Retry-After
    max_context: int = 2048  # tokens per sequence (prompt + completion), capped by the model's context
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    max_body_bytes: int = 1_000_000
    max_prompt_tokens_per_request: int = 16384  # over all of a request's prompts x n
    max_embedding_tokens_per_request: int = 16384  # over all of an embeddings request's inputs
    allow_special_tokens_in_prompts: bool = False  # let /v1/completions prompts write special tokens as text
    # chat requests' image_url parts (a vision-language model's): each image's file, their count, their size
    max_image_bytes: int = 700_000  # its base64 (4/3 of it) fits in the default max_body_bytes
    max_images_per_request: int = 4
    max_image_side_pixels: int = 2048
    cors_origins: list[str] = field(default_factory=list)  # comma-separated on the command line
    drain_seconds: float = 10.0  # on SIGTERM, how long requests may go on; then each ends with finish_reason "length"
    threads: int | None = None  # default: $LMFORGE_THREADS, else chosen per decoding step from measured speed
    # cpu, auto, cuda (under torchrun this process's GPU) or cuda:N: where the model, its KV cache and each
    # step run; sampling stays on the CPU. GGUF blocks and the native kernels are CPU-only: on a GPU a GGUF's
    # weights load dequantised.
    device: str = "cpu"
    # reuse the keys and values of a prompt's leading tokens that a slot already holds (a chat's
    # earlier turns, a shared system prompt) instead of prefilling them again
    no_prefix_cache: bool = False


def build_app(config: ServeConfig):
    """The FastAPI app for `config` (model loaded, scheduler ready to start with the app)."""
    from lmforge.apps.encoder import SentenceEmbedder
    from lmforge.apps.vlm import default_sampling as vlm_default_sampling
    from lmforge.apps.vlm import is_vlm_folder, load_vlm
    from lmforge.formats.loading import SamplingDefaults, load, sampling_defaults
    from lmforge.serve.app import ServedModels, ServeLimits, create_app
    from lmforge.serve.images import ImageLimits
    from lmforge.serve.scheduler import Scheduler
    from lmforge.training.pretrain import resolve_device

    if config.max_batch < 1 or config.max_context < 2 or config.max_queue < 1 or config.drain_seconds < 0:
        raise LmforgeError("max_batch and max_queue must be >= 1, max_context >= 2, drain_seconds >= 0")
    if min(config.max_image_bytes, config.max_images_per_request, config.max_image_side_pixels) < 1:
        raise LmforgeError("max_image_bytes, max_images_per_request and max_image_side_pixels must be >= 1")
    device = str(resolve_device(config.device))  # a bad or missing device is an error before minutes of loading
    vision = None
    if is_vlm_folder(config.model):  # chat takes image_url parts
        if config.adapter:
            raise LmforgeError(f"{config.model} is a vision-language model folder; its adapter is in it (no --adapter)")
        vision, tokenizer = load_vlm(config.model, device=device)
        model = vision.language_model
        defaults = SamplingDefaults(vlm_default_sampling(), "lmforge's default for vision-language models")
    else:
        model, tokenizer = load(
            config.model, device=device, keep_quantized=config.keep_quantized, adapter=config.adapter
        )
        defaults = sampling_defaults(config.model, tokenizer)
    if config.adapter:
        from lmforge.finetune.lora import describe_adapter

        print(describe_adapter(config.adapter), file=sys.stderr)
    scheduler = Scheduler(
        model,
        tokenizer,
        max_batch=config.max_batch,
        max_context=config.max_context,
        max_queue=config.max_queue,
        prefix_cache=not config.no_prefix_cache,
        vision=vision,
    )
    embedder = None
    if config.embedding_model.lower() != "none":
        try:
            embedder = SentenceEmbedder(config.embedding_model)
        except LmforgeError as error:
            print(f"no embeddings endpoint: {error}", file=sys.stderr)
    served = ServedModels(
        name=config.model_name or os.path.basename(str(config.model).rstrip("/")),
        scheduler=scheduler,
        embedding_name=config.embedding_model if embedder else None,
        embedder=embedder,
        sampling_defaults=defaults,
    )
    limits = ServeLimits(
        max_tokens=config.max_tokens,
        max_body_bytes=config.max_body_bytes,
        api_key=config.api_key or os.environ.get("LMFORGE_API_KEY") or None,
        cors_origins=config.cors_origins,
        max_prompt_tokens_per_request=config.max_prompt_tokens_per_request,
        max_embedding_tokens_per_request=config.max_embedding_tokens_per_request,
        allow_special_tokens_in_prompts=config.allow_special_tokens_in_prompts,
        images=ImageLimits(config.max_image_bytes, config.max_images_per_request, config.max_image_side_pixels),
    )
    return create_app(served, limits, drain_seconds=config.drain_seconds)


def check_address(host: str, port: int) -> None:
    """An address the server can listen on: a port in range, a host that resolves, and no other server
    there (uvicorn would report these only after the model loaded, with its own exit code)."""
    if not 0 <= port <= 65535:
        raise LmforgeError(f"port {port}: must be between 0 and 65535")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise LmforgeError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --host or --port"
        ) from None


def serve(config: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM; then stop accepting, drain, and exit."""
    import uvicorn

    from lmforge.inference.engine import set_decode_threads, threads_from_environment

    set_decode_threads(config.threads or threads_from_environment())
    check_address(config.host, config.port)  # before minutes of loading, not after
    app = build_app(config)
    scheduler = app.state.scheduler

    class DrainingServer(uvicorn.Server):
        # uvicorn waits for open connections before it runs the app's shutdown, so the drain must
        # start at the signal: then every stream ends (with [DONE]) by the deadline and uvicorn's
        # wait ends with it.
        def handle_exit(self, sig, frame):
            scheduler.begin_drain(config.drain_seconds)
            super().handle_exit(sig, frame)

    from lmforge.settings import describe_sampling

    defaults = app.state.sampling_defaults
    print(f"serving {config.model} on http://{config.host}:{config.port} (chat page at /)", file=sys.stderr)
    print(f"default sampling: {describe_sampling(defaults.sampling)} ({defaults.source})", file=sys.stderr)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=math.ceil(config.drain_seconds) + 1,  # a backstop; the drain ends first
        )
    )
    server.run()
