"""Structured outputs through the server: `response_format` on /v1/chat/completions and /v1/completions, with
the shipped SmolLM2 behind a live server, driven by the `openai` client (its `parse` helper included) and by
langchain-openai's `with_structured_output`; and the Scheduler keeping a matcher per sequence in one batch."""

import json
import time

import pytest
import torch
from pydantic import BaseModel, Field

from lmforge.formats.loading import load
from lmforge.inference.chat import stop_token_ids
from lmforge.inference.generate import SamplingConfig, generate_tokens
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServedModels, ServeLimits, create_app
from lmforge.serve.scheduler import GenerationRequest, Scheduler
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import CharTokenizer

from ..conftest import skip_without_smollm2
from .test_serve import LiveServer, raw

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
    },
    "required": ["name", "country", "population"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe Paris as JSON with its name, country and population."}]


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=50_000_000)


@pytest.fixture(scope="module")
def smollm2_server():
    skip_without_smollm2()
    model, tokenizer = load("smollm2-135m-instruct")
    scheduler = Scheduler(model, tokenizer, max_batch=4, max_context=512)
    server = LiveServer(create_app(ServedModels("smollm2", scheduler), ServeLimits(max_tokens=200)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{smollm2_server.port}/v1", api_key="none", max_retries=0)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


def test_json_schema_replies_validate_and_end_with_stop(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, n=3, temperature=1.0, seed=1, max_tokens=80,
        response_format=json_schema_format(CITY),
    )  # fmt: skip
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), CITY)
        assert choice.finish_reason == "stop"


def test_streamed_json_schema_reply_validates(client):
    chunks = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=1.0, seed=2, max_tokens=80, stream=True,
        response_format=json_schema_format(CITY),
    )  # fmt: skip
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(text), CITY)


def test_json_object_gives_a_json_object(client):
    # greedy: a sampled free-form object can grow keys past any max_tokens, and which seed stops in time
    # changed with the CPU's kernel path (AVX-512 VNNI here vs AVX2 on the CI machine)
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0.0, max_tokens=200,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_completions_take_response_format_too(client):
    reply = client.completions.create(
        model="smollm2", prompt="Paris as JSON: ", temperature=1.0, seed=4, max_tokens=80,
        extra_body={"response_format": json_schema_format(CITY)},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.choices[0].text), CITY)


def test_text_is_the_default_format(client):
    plain = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=12)
    text = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=12, response_format={"type": "text"}
    )
    assert text.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    "response_format, param, words",
    [
        ({"type": "xml"}, "response_format.type", "json_schema"),
        ({"type": "json_schema"}, "response_format", "needs json_schema"),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": CITY}}, "response_format", "goes with"),
        ({"type": "json_schema", "json_schema": {"schema": CITY}}, "response_format.json_schema.name", "Field"),
        (json_schema_format({"type": "objekt"}), "response_format", "objekt"),
        ({"type": "json_object", "grammar": "start: x"}, "response_format.grammar", "unsupported field"),
    ],
)
def test_a_response_format_the_server_cannot_follow_is_a_400_naming_the_field(
    smollm2_server, response_format, param, words
):
    body = {"messages": ASK, "max_tokens": 8, "response_format": response_format}
    status, data = raw(smollm2_server.port, "POST", "/v1/chat/completions", json.dumps(body).encode(), key=None)
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == param and words in error["message"]


def test_openai_parse_returns_a_validated_pydantic_object(client):
    completion = client.beta.chat.completions.parse(
        model="smollm2", messages=ASK, response_format=City, temperature=0.7, seed=5, max_tokens=80
    )
    assert isinstance(completion.choices[0].message.parsed, City)


def test_langchain_with_structured_output_returns_the_model(smollm2_server):
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    llm = chat_openai(
        model="smollm2", base_url=f"http://127.0.0.1:{smollm2_server.port}/v1", api_key="none",
        temperature=0.7, max_tokens=80, max_retries=0,
    )  # fmt: skip
    city = llm.with_structured_output(City).invoke("Describe Paris: its name, country and population.")
    assert isinstance(city, City)


# --- the Scheduler: one matcher per sequence, inside continuous batching ---------------------------------

SMALL = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer", "count"],
    "additionalProperties": False,
}


def test_the_scheduler_constrains_each_sequence_by_its_own_schema():
    tokenizer = CharTokenizer('abcdefghijklmnopqrstuvwxyz0123456789{}[]":,. ')
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=128, n_layers=2, n_heads=2, n_kv_heads=1, d_model=32,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    model = Transformer(config).eval()
    scheduler = Scheduler(model, tokenizer, max_batch=4, max_context=128)
    scheduler.start()
    events: dict[int, list] = {index: [] for index in range(4)}
    stops = frozenset(stop_token_ids(tokenizer))
    free = SamplingConfig(max_new_tokens=40, temperature=0)
    requests = [
        GenerationRequest(
            prompt_ids=[5 + index, 6],
            max_tokens=40,
            emit=events[index].append,
            sampling=SamplingConfig(max_new_tokens=40, temperature=1.0, seed=index, json_schema=SMALL)
            if index % 2 == 0
            else free,
            stop_ids=stops,
        )
        for index in range(4)
    ]
    try:
        scheduler.submit_all(requests)
        deadline = time.monotonic() + 60
        while not all(e and e[-1][0] in ("done", "error") for e in events.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scheduler.shutdown(1)
    for index, request in enumerate(requests):
        text = "".join(event[1] for event in events[index] if event[0] == "text")
        if index % 2 == 0:
            jsonschema.validate(json.loads(text), SMALL)
            assert events[index][-1][1] == "stop"
        else:  # its neighbours' grammars leave an unconstrained sequence as it would be alone
            alone = []
            for token in generate_tokens(model, request.prompt_ids, free):
                if token in stops:
                    break
                alone.append(token)
            assert text == tokenizer.decode(alone)


def test_a_tokenizer_constrained_decoding_cannot_drive_is_a_400_not_a_500():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from lmforge.tokenizer import BPETokenizer

    words = ["[UNK]", "<|endoftext|>", "paris", "is", "big", "{", "}"]
    hf = HFTokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = BPETokenizer(hf, ["<|endoftext|>"])
    config = ModelConfig(vocab_size=len(words), block_size=64, n_layers=1, n_heads=2, d_model=16, **LLAMA_SWITCHES)
    scheduler = Scheduler(Transformer(config).eval(), tokenizer, max_batch=2, max_context=64)
    server = LiveServer(create_app(ServedModels("words", scheduler), ServeLimits(max_tokens=8)))
    try:
        body = {"prompt": "paris is", "max_tokens": 4, "response_format": {"type": "json_object"}}
        status, data = raw(server.port, "POST", "/v1/completions", json.dumps(body).encode(), key=None)
    finally:
        server.stop()
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == "response_format" and "WordLevel" in error["message"]
