"""Tool calling in the inference layer: prompts (the template's own `tools`, or the fallback prompt),
reading replies into calls, whole and streamed, and the grammar that forces a call."""

import json
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.inference.chat import chat_pieces, encode_chat, render_chat, template_inputs
from lmforge.inference.tools import (
    HERMES,
    JSON_CALL,
    LLAMA3,
    TOOLS_FALLBACK_PROMPT,
    ToolCallReader,
    call_format,
    call_grammar,
    parse_reply,
)
from lmforge.tokenizer import BPETokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city <today> & 'now'",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
NAMES = {"get_weather", "get_time"}

# A conversation as the OpenAI API carries it: call arguments as JSON text, a tool result with its call's id.
HISTORY = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
]


def transformers_messages(messages):
    """The same conversation as transformers' callers pass it: arguments as a mapping."""
    return [
        {
            **message,
            "tool_calls": [
                {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ],
        }
        if message.get("tool_calls")
        else message
        for message in messages
    ]


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.1"])
@pytest.mark.parametrize("history", [False, True])
def test_tools_render_through_the_template_as_transformers_passes_them(family, history):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (TEMPLATES / f"{family}.jinja").read_text()
    messages = HISTORY if history else HISTORY[:2]
    theirs = render_jinja_template(
        [transformers_messages(messages)], tools=[WEATHER, CLOCK], chat_template=template, add_generation_prompt=True
    )[0][0]
    rendered_messages, tools = template_inputs(messages, [WEATHER, CLOCK], template)
    ours = render_chat(rendered_messages, template, tools=tools)
    assert ours == theirs
    assert "get_time" in ours and "<today> & 'now'" in ours  # tools as given, not HTML-escaped
    if history:
        assert '"city": "Paris"' in ours and "sunny" in ours


def test_a_template_without_tools_gets_the_fallback_prompt_and_the_history_as_text():
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages, tools = template_inputs(HISTORY, [WEATHER], template)
    assert tools is None
    expected_prompt = TOOLS_FALLBACK_PROMPT.format(tools=json.dumps(WEATHER, ensure_ascii=False))
    assert messages == [
        {"role": "system", "content": "You help.\n\n" + expected_prompt},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
        },
        {"role": "user", "content": '<tool_response>\n{"sky": "sunny"}\n</tool_response>'},
    ]
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in expected_prompt
    # no tools offered and no calls in the history: the conversation is rendered as it was
    assert template_inputs(HISTORY[:2], None, template)[0] == HISTORY[:2]


@pytest.fixture(scope="module")
def chatml_tokenizer():
    corpus = ["the weather in Paris is sunny, the time is noon " * 20]
    tokenizer = BPETokenizer.train(corpus, vocab_size=300)
    tokenizer.chat_template = (TEMPLATES / "qwen2.5.jinja").read_text()
    return tokenizer


def test_control_tokens_in_tool_definitions_or_calls_are_refused(chatml_tokenizer):
    special = chatml_tokenizer.special_tokens[0]
    forged = {"type": "function", "function": {"name": "f", "description": f"x{special}y"}}
    with pytest.raises(LmforgeError, match=r"tools\[0\] contains the control token"):
        encode_chat(chatml_tokenizer, HISTORY[:2], tools=[forged])
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps({"a": special})}}
    with pytest.raises(LmforgeError, match="message 1: a tool call contains the control token"):
        encode_chat(chatml_tokenizer, [HISTORY[1], {"role": "assistant", "content": None, "tool_calls": [call]}])


def test_message_contents_stay_text_next_to_tool_calls(chatml_tokenizer):
    pieces = chat_pieces(chatml_tokenizer, HISTORY, tools=[WEATHER])
    contents = [text for text, is_markup in pieces if not is_markup]
    assert contents == ["You help.", "Weather in Paris?", '{"sky": "sunny"}']


def test_call_format_follows_the_template():
    assert call_format((TEMPLATES / "qwen2.5.jinja").read_text()) == HERMES
    assert call_format((TEMPLATES / "llama3.1.jinja").read_text()) == LLAMA3
    assert call_format("{% for m in messages %}{{ m.content }}{% endfor %}") == HERMES  # the fallback prompt's
    assert call_format("{% if tools %}{{ tools | tojson }}{% endif %}") == JSON_CALL


@pytest.mark.parametrize(
    "reply",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n</tool_call>',
        '{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}',  # Llama 3.1
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}',
        ' {"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\", \\"days\\": 3}"}\n',  # arguments as text
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}]</tool_call>',  # SmolLM2
    ],
)
def test_each_family_format_reads_as_one_call(reply):
    parsed = parse_reply(reply, NAMES)
    assert parsed.content is None
    [call] = parsed.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Rome", "days": 3}
    assert call.id.startswith("call_")


def test_several_calls_and_the_text_around_them():
    reply = (
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    parsed = parse_reply(reply, NAMES)
    assert parsed.content == "Let me check both."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 1}),
        ("get_time", {}),
    ]
    assert len({c.id for c in parsed.tool_calls}) == 2
    llama = '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Rome"}}'
    assert [c.name for c in parse_reply(llama, NAMES).tool_calls] == ["get_time", "get_weather"]
    listed = '[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]'
    assert len(parse_reply(listed, NAMES).tool_calls) == 2
    assert len(parse_reply("[TOOL_CALLS] " + listed, NAMES).tool_calls) == 2  # Mistral


@pytest.mark.parametrize(
    "reply",
    [
        "Paris is sunny today.",
        '{"answer": 42}',  # JSON, not a call
        '{"name": "delete_everything", "arguments": {}}',  # a function nobody offered
        '{"name": "get_time", "arguments": [1, 2]}',  # arguments that are no object
        '<tool_call>{"name": "get_time", "arguments": {</tool_call> and then',  # broken JSON
        "[1] a footnote",
    ],
)
def test_text_that_is_no_call_stays_content(reply):
    parsed = parse_reply(reply, NAMES)
    assert parsed.tool_calls == [] and parsed.content == reply.strip()


def test_a_streamed_reply_reads_as_the_whole_one_and_never_shows_call_markup():
    reply = (
        "Sure <b>.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    )
    whole = parse_reply(reply, NAMES)
    for size in (1, 2, 3, 7):
        reader = ToolCallReader(NAMES)
        pieces = []
        for start in range(0, len(reply), size):
            pieces += reader.push(reply[start : start + size])
        pieces += reader.finish()
        content = "".join(piece.content for piece in pieces)
        assert content == whole.content == "Sure <b>."
        assert "<tool_call" not in content
        calls = [piece.call for piece in pieces if piece.call]
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_plain_text_streams_as_it_comes():
    reader = ToolCallReader(NAMES)
    assert [p.content for p in reader.push("Hello")] == ["Hello"]
    assert [p.content for p in reader.push(" world <tool")] == [" world"]  # '<tool' may open a call
    assert [p.content for p in reader.push("box> ok")] == [" <toolbox> ok"]
    assert reader.finish() == []


def grammar_matcher(tokenizer, grammar):
    llguidance = pytest.importorskip("llguidance")
    lltokenizer = llguidance.LLTokenizer(tokenizer.hf.to_str(), eos_token=tokenizer.eos_id)
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.grammar_from("lark", grammar))
    assert not matcher.is_error(), matcher.get_error()
    return lltokenizer, matcher


def accepts(tokenizer, grammar, text) -> bool:
    lltokenizer, matcher = grammar_matcher(tokenizer, grammar)
    tokens = lltokenizer.tokenize_str(text)
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


@pytest.mark.parametrize("form", [HERMES, LLAMA3, JSON_CALL])
def test_the_call_grammar_takes_valid_calls_only(chatml_tokenizer, form):
    functions = {"get_weather": WEATHER["function"]["parameters"], "get_time": None}
    grammar = call_grammar(functions, form, parallel=False)
    key = "parameters" if form == LLAMA3 else "arguments"

    def written(name, arguments):
        call = f'{{"name": "{name}", "{key}": {json.dumps(arguments)}}}'
        return f"<tool_call>\n{call}\n</tool_call>" if form == HERMES else call

    assert accepts(chatml_tokenizer, grammar, written("get_weather", {"city": "Rome", "days": 3}))
    assert accepts(chatml_tokenizer, grammar, written("get_time", {}))
    for arguments in ({"city": "Oslo", "days": 3}, {"city": "Rome", "days": 9}, {"city": "Rome"}):
        assert not accepts(chatml_tokenizer, grammar, written("get_weather", arguments))
    assert not accepts(chatml_tokenizer, grammar, written("get_wether", {}))
    assert not accepts(chatml_tokenizer, grammar, "Sure! " + written("get_time", {}))
    two = written("get_time", {}) + "\n" + written("get_time", {})
    assert not accepts(chatml_tokenizer, grammar, two)
    if form == HERMES:
        assert accepts(chatml_tokenizer, call_grammar(functions, form, parallel=True), two)
        assert parse_reply(two, NAMES).tool_calls[1].name == "get_time"


@pytest.mark.parametrize("form", [HERMES, LLAMA3])
def test_the_auto_grammar_takes_text_or_valid_calls(chatml_tokenizer, form):
    """tool_choice "auto" with strict functions: text, or calls that are valid; never a call the
    reader would take that the schema refuses."""
    functions = {"get_weather": WEATHER["function"]["parameters"]}
    grammar = call_grammar(functions, form, parallel=False, text_allowed=True)
    key = "parameters" if form == LLAMA3 else "arguments"
    valid = f'{{"name": "get_weather", "{key}": {{"city": "Rome", "days": 3}}}}'
    invalid = f'{{"name": "get_weather", "{key}": {{"city": "Oslo", "days": 3}}}}'

    def block(call):
        return f"<tool_call>\n{call}\n</tool_call>"

    assert accepts(chatml_tokenizer, grammar, "It is sunny in Paris.")
    assert accepts(chatml_tokenizer, grammar, "  two\nlines")
    assert accepts(chatml_tokenizer, grammar, block(valid) if form == HERMES else valid)
    assert not accepts(chatml_tokenizer, grammar, block(invalid) if form == HERMES else invalid)
    assert not accepts(chatml_tokenizer, grammar, '{"answer": 42}')  # read as a call attempt: refused
    assert not accepts(chatml_tokenizer, grammar, "Sure. " + block(invalid))  # the reader reads blocks anywhere
    if form == HERMES:
        assert accepts(chatml_tokenizer, grammar, "Let me look.\n" + block(valid))
        assert not accepts(chatml_tokenizer, grammar, block(valid) + "\n" + block(valid))  # one call: no parallel
        assert not accepts(chatml_tokenizer, grammar, "Sure <tool_call> is a tag")


def test_declared_arguments_only_unless_the_schema_allows_more(chatml_tokenizer):
    closed = call_grammar({"get_time": {"type": "object", "properties": {}}}, JSON_CALL, parallel=False)
    opened = call_grammar(
        {"get_time": {"type": "object", "properties": {}, "additionalProperties": True}}, JSON_CALL, parallel=False
    )
    extra = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
    assert not accepts(chatml_tokenizer, closed, extra)
    assert accepts(chatml_tokenizer, opened, extra)
