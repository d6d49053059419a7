"""Tool calling: how a conversation offers functions to a model, how its reply is read back as calls,
and the grammar that makes a reply a call when one is required.

A chat template that takes tools (it reads the `tools` variable) gets them as transformers'
`apply_chat_template(tools=...)` passes them: the OpenAI-shaped definitions, as given. A template
without tool support gets `TOOLS_FALLBACK_PROMPT` in the system message instead, and the history's
calls and results are written into the messages' text in the same Hermes format.

Replies are read the same way whatever the family, since models drift between the formats:
`<tool_call>{...}</tool_call>` blocks (Hermes, Qwen 2.5/3, SmolLM2: an object or a list of them per
block), or a reply that is as a whole a JSON call (Llama 3.1's `{"name", "parameters"}`, the generic
`{"name", "arguments"}`, a list of them as Mistral's `[TOOL_CALLS] [...]`, or several separated by ";").
A call must name an offered function and give a JSON object as its arguments; any other text stays the
reply's content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from lmforge.settings import JSON_LAYOUT

# The formats a reply is forced into when a call is required: the one the template teaches.
HERMES, LLAMA3, JSON_CALL = "hermes", "llama3", "json"

TOOLS_FALLBACK_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
"""What a template without tool support gets as (the end of) its system message when tools are offered:
Qwen 2.5's own tool prompt, the Hermes format most open models are trained on. `{tools}`: one JSON
definition per line."""

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it
MISTRAL_CALLS_TAG = "[TOOL_CALLS]"  # Mistral opens its list of calls with it
MAX_PARALLEL_CALLS = 8  # calls a reply may make when a call is required and parallel calls are allowed


def takes_tools(template: str) -> bool:
    """Does this chat template render a `tools` variable (transformers' convention)?"""
    return re.search(r"\btools\b", template) is not None


def call_format(template: str) -> str:
    """The call format a chat template teaches its model: Hermes (`<tool_call>` blocks), Llama 3.1
    (`{"name", "parameters"}`), else a JSON object `{"name", "arguments"}`. A template without tool
    support gets the fallback prompt, which teaches Hermes."""
    if not takes_tools(template) or CALL_OPEN in template:
        return HERMES
    if '"parameters"' in template or PYTHON_TAG in template:
        return LLAMA3
    return JSON_CALL


@dataclass
class ToolCall:
    """One call the model made: a function's name and its arguments as a JSON object's text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def history_call_arguments(arguments: str):
    """A call from the history as templates expect it: arguments as a mapping (the OpenAI API sends
    them as JSON text; templates write them with `tojson` or iterate them), or the text as it is."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def with_fallback_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """`messages` for a template without tool support: the offered tools in the system message
    (`TOOLS_FALLBACK_PROMPT`), the history's calls as `<tool_call>` blocks in the assistant's text,
    and tool results as a user message of `<tool_response>` blocks (as Qwen 2.5's template writes them)."""
    written: list[dict] = []
    for message in messages:
        if message.get("tool_calls"):
            blocks = [
                f'{CALL_OPEN}\n{{"name": {json.dumps(call["function"]["name"])}, '
                f'"arguments": {call["function"]["arguments"]}}}\n{CALL_CLOSE}'
                for call in message["tool_calls"]
            ]
            text = "\n".join([message["content"], *blocks] if message.get("content") else blocks)
            written.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if written and written[-1].get("tool_results"):
                written[-1]["content"] += "\n" + response
            else:
                written.append({"role": "user", "content": response, "tool_results": True})
        else:
            written.append({"role": message["role"], "content": message["content"]})
    for message in written:
        message.pop("tool_results", None)
    if tools:
        prompt = TOOLS_FALLBACK_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if written and written[0]["role"] == "system":
            written[0] = {"role": "system", "content": f"{written[0]['content']}\n\n{prompt}"}
        else:
            written.insert(0, {"role": "system", "content": prompt})
    return written


def _as_calls(value, names: set[str]) -> list[ToolCall] | None:
    """`value` (parsed JSON) as calls to offered functions, or None if it is not that."""
    items = value if isinstance(value, list) and value else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def calls_in_json(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls a whole reply makes as JSON (one call, a list, or calls separated by ';'), or None."""
    text = text.strip().removeprefix(PYTHON_TAG).removeprefix(MISTRAL_CALLS_TAG).strip()
    try:
        return _as_calls(json.loads(text), names)
    except ValueError:
        pass
    parts = text.split(";")
    if len(parts) < 2:
        return None
    try:
        values = [json.loads(part) for part in parts]
    except ValueError:
        return None
    if not all(isinstance(value, dict) for value in values):
        return None
    return _as_calls(values, names)


@dataclass
class ReplyPiece:
    """What the reader makes of the reply so far: content text to show, or a complete call."""

    content: str = ""
    call: ToolCall | None = None


class ToolCallReader:
    """Reads a reply as it streams, separating its text from its tool calls.

    Text streams out as it comes, except what may be the start of a call: from a `<tool_call>` tag
    to its closing tag (the block is then a call, or its text if it does not hold one), and a whole
    reply that starts like JSON (`{`, `[`, `<|python_tag|>`), held to the end. Whitespace around
    calls is not content.
    """

    def __init__(self, names: set[str]):
        self.names = names
        self.pending = ""  # text received and not yet handed out
        self.mode = "start"  # start -> text | json; text <-> block
        self.space = ""  # whitespace after content, handed out only if more content follows
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[ReplyPiece]:
        self.pending += text
        pieces: list[ReplyPiece] = []
        while True:
            if self.mode == "start":
                stripped = self.pending.lstrip()
                if not stripped:
                    return pieces
                if stripped[0] in "{[" or stripped.startswith(PYTHON_TAG):
                    self.mode = "json"
                elif PYTHON_TAG.startswith(stripped) and len(stripped) < len(PYTHON_TAG):
                    return pieces  # could still become the tag
                else:
                    self.mode, self.pending = "text", stripped
            if self.mode == "json":
                return pieces
            if self.mode == "text":
                start = self.pending.find(CALL_OPEN)
                if start < 0:
                    held = _partial_suffix(self.pending, CALL_OPEN)
                    self._content(self.pending[: len(self.pending) - held], pieces)
                    self.pending = self.pending[len(self.pending) - held :]
                    return pieces
                self._content(self.pending[:start], pieces)
                self.pending, self.mode = self.pending[start:], "block"
            if self.mode == "block":
                end = self.pending.find(CALL_CLOSE)
                if end < 0:
                    return pieces
                end += len(CALL_CLOSE)
                self._block(self.pending[:end], pieces)
                self.pending, self.mode = self.pending[end:], "text"

    def finish(self) -> list[ReplyPiece]:
        """The rest, once the reply has ended: a held JSON reply or an unclosed block (a call if
        it holds one), or text."""
        pieces: list[ReplyPiece] = []
        rest, self.pending = self.pending, ""
        if self.mode == "json":
            calls = calls_in_json(rest, self.names)
            if calls is None:
                self._content(rest.strip(), pieces)
            for call in calls or []:
                self._call(call, pieces)
        elif self.mode == "block":
            self._block(rest, pieces)
        else:
            self._content(rest.rstrip(), pieces)
        return pieces

    def _block(self, block: str, pieces: list[ReplyPiece]) -> None:
        body = block.removeprefix(CALL_OPEN).removesuffix(CALL_CLOSE)
        try:
            calls = _as_calls(json.loads(body), self.names)
        except ValueError:
            calls = None
        if calls is None:
            self._content(block, pieces)
        for call in calls or []:
            self._call(call, pieces)

    def _content(self, text: str, pieces: list[ReplyPiece]) -> None:
        body = text.rstrip()
        if body.strip():
            pieces.append(ReplyPiece(content=self.space + body))
            self.space = text[len(body) :]
        else:
            self.space += text

    def _call(self, call: ToolCall, pieces: list[ReplyPiece]) -> None:
        self.calls.append(call)
        pieces.append(ReplyPiece(call=call))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag` (held back: the tag may be arriving)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


@dataclass
class ParsedReply:
    """A whole reply read into its content (None if it had none) and its tool calls."""

    content: str | None
    tool_calls: list[ToolCall]


def parse_reply(text: str, names: set[str]) -> ParsedReply:
    """Read a complete reply as `ToolCallReader` reads a streamed one."""
    reader = ToolCallReader(names)
    pieces = reader.push(text) + reader.finish()
    content = "".join(piece.content for piece in pieces)
    return ParsedReply(content or None, reader.calls)


def _lark_text(text: str) -> str:
    # a JSON string literal is a valid Lark string literal (same escapes)
    return json.dumps(text, ensure_ascii=False)


# Lexemes of a reply that may be text instead of calls (llguidance regexes: `&` is "and", `~` is "not").
# Text: not starting like a JSON call (the reader takes such a reply for one), no <tool_call> anywhere.
# Text that opens a call: the same, up to its first <tool_call> and the line break after it.
_TEXT = r"TEXT: /(?s:\s*[^\s{\[].*)/ & ~/(?s:.*<tool_call>.*)/"
_TEXT_THEN_CALL = r"TEXT_THEN_CALL: /(?s:\s*([^\s{\[].*)?<tool_call>\n)/ & ~/(?s:.*<tool_call>.*<tool_call>.*)/"


def call_grammar(functions: dict[str, dict | None], form: str, parallel: bool, text_allowed: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) whose every sentence is a call, in `form`, to one of
    `functions` (name -> JSON Schema of its parameters) with arguments valid under its schema;
    one call, or up to MAX_PARALLEL_CALLS where `parallel` and the format has a way to write several.
    A schema with `properties` and no `additionalProperties` gets `"additionalProperties": false`.

    `text_allowed`: the reply may also be text (tool_choice "auto" with strict functions), and in the
    Hermes format text followed by calls; whatever `ToolCallReader` would read as a call is one, valid."""
    name_key = "parameters" if form == LLAMA3 else "arguments"
    rules = []
    for index, (name, schema) in enumerate(functions.items()):
        schema = schema or {"type": "object"}
        if "properties" in schema:
            # The declared arguments only, unless the schema says otherwise: JSON Schema allows any others by
            # default, and a small model forced to call keeps inventing them until max_tokens (measured:
            # SmolLM2-135M wrote 14 made-up keys into a one-property schema).
            schema = {"additionalProperties": False, **schema}
        # laid out as json.dumps writes JSON, as SamplingConfig.json_schema is (JSON_LAYOUT says why)
        schema_text = json.dumps({**schema, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)
        head = _lark_text(f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{name_key}": ')
        rules.append(f"fn_{index}: {head} %json{schema_text} " + _lark_text("}"))
    body = "body: " + " | ".join(f"fn_{i}" for i in range(len(rules)))
    if form == HERMES:
        close = _lark_text("\n" + CALL_CLOSE)
        more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        grammar = [f"start: call{more}", f"call: {_lark_text(CALL_OPEN + chr(10))} body {close}"]
        if text_allowed:
            grammar = [
                f"start: TEXT | TEXT_THEN_CALL body {close}{more}",
                grammar[1],
                _TEXT,
                _TEXT_THEN_CALL,
            ]
    else:  # Llama 3.1 and the generic form: the reply is one JSON call
        grammar = ["start: TEXT | body", _TEXT] if text_allowed else ["start: body"]
    return "\n".join([*grammar, body, *rules])
