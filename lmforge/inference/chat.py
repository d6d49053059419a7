"""Chat: templates rendered with Jinja (the model's own, or ChatML), history, and the terminal loop."""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError
from lmforge.inference.generate import generate
from lmforge.inference.tools import history_call_arguments, takes_tools, with_fallback_tools
from lmforge.model import Transformer
from lmforge.settings import SamplingConfig, fallback_sampling
from lmforge.tokenizer import CHAT_END, CHAT_START, Tokenizer, stop_token_ids  # noqa: F401 - chat's stop tokens

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# For a base model whose tokenizer has neither a template nor ChatML's tokens: turns as plain lines, which
# any text model can continue; its reply ends where it starts the user's next line.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
PLAIN_TEMPLATE_STOP = "\nUser:"
ROLES = ("system", "user", "assistant", "tool")


MAX_TEMPLATE_SECONDS = 2.0  # real chat templates render in milliseconds
MAX_RENDERED_CHARS = 4_000_000  # what a rendering (or any string a template builds) may reach
MAX_TEMPLATE_NUMBER = 100_000  # the largest count, width or exponent a template may pass (jinja's own range limit)


_PADDING_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}  # str methods that allocate their argument


class TemplateLimitError(LmforgeError):
    pass


def _check_numbers(values) -> None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_NUMBER:
            raise TemplateLimitError(f"chat template: the number {value} is beyond the limit of {MAX_TEMPLATE_NUMBER}")


def _bounded_filter(function):
    # The value filtered comes first (after the context or environment, for filters that take one).
    options_from = 2 if getattr(function, "jinja_pass_arg", None) else 1

    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _check_numbers(args[options_from:])
        _check_numbers(kwargs.values())
        return function(*args, **kwargs)

    return bounded


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens with it (for
    training masks); rendering a prompt, the body is written as it is."""

    tags = {"generation"}

    def parse(self, parser):
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(line)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no Python internals, no mutation) with bounds on what a template
    may allocate: a chat template comes with a downloaded model and runs on every request.

    Intercepted operators are also never folded at compile time, so `'x' * 10**9` is refused, not built.
    """

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self):
        # transformers' environment (apply_chat_template): {% break %}/{% continue %}, its {% generation %}
        # tag, and a tojson that writes text as it is (jinja's own escapes <, >, & and ' for HTML, and sorts keys).
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(function) for name, function in self.filters.items()}

    def call_binop(self, context, operator, left, right):
        if operator == "*" and isinstance(left, int | float) and isinstance(right, str | list | tuple):
            left, right = right, left
        if operator == "*" and isinstance(left, str | list | tuple) and isinstance(right, int):
            if len(left) * right > MAX_RENDERED_CHARS:
                raise TemplateLimitError(f"chat template: a repeated value would exceed {MAX_RENDERED_CHARS} items")
        elif operator == "**":
            _check_numbers([right])
        elif operator == "%" and isinstance(left, str):
            # printf widths and precisions allocate in C before anything can stop them
            specs = re.findall(r"%[-#0 +]*(\d*)(?:\.(\d*))?", left)
            _check_numbers(int(number) for spec in specs for number in spec if number)
            if "%*" in left or ".*" in left:
                raise TemplateLimitError("chat template: '*' widths are not allowed in % formatting")
        result = super().call_binop(context, operator, left, right)
        if operator == "+" and isinstance(result, str | list | tuple) and len(result) > MAX_RENDERED_CHARS:
            raise TemplateLimitError(f"chat template: a value would exceed {MAX_RENDERED_CHARS} items")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        if getattr(__obj, "__name__", None) in _PADDING_METHODS:
            _check_numbers(args)
            _check_numbers(kwargs.values())
        return super().call(__context, __obj, *args, **kwargs)


def _raise_exception(text: str):
    raise LmforgeError(f"chat template: {text}")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    environment = BoundedSandbox()
    environment.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return environment.from_string(template)


def _render_bounded(template, variables: dict) -> str:
    """Render with a deadline (a line-trace on the template's own code, so loops that neither call
    nor print are stopped too) and a cap on the output."""
    deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"chat template: rendering took longer than {MAX_TEMPLATE_SECONDS:g} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    chunks, size = [], 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise TemplateLimitError(f"chat template: the rendered prompt exceeds {MAX_RENDERED_CHARS} characters")
            chunks.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(chunks)


def render_chat(
    messages: list[dict],
    template: str | None = None,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The prompt text for `messages` ({'role', 'content'} dicts; an assistant's may have `tool_calls`
    and no content) and the offered `tools`, as HF's apply_chat_template(tools=...) renders it."""
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not (
                isinstance(message.get("content"), str)
                or (message.get("content") is None and message.get("tool_calls"))
            )
        ):
            raise LmforgeError(f"message {index}: needs a role in {ROLES} and string content, got {message!r}")
    variables = dict(
        messages=messages,
        tools=tools or None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )
    try:
        return _render_bounded(_compiled(template or CHATML_TEMPLATE), variables)
    except LmforgeError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a downloaded template does wrong is its error, not ours
        raise LmforgeError(f"chat template failed: {type(error).__name__}: {error}") from None


_CONTENT_MARK = "\ue000{}\ue001"  # private-use characters: a message's place in a rendering
_CONTENT_MARK_PATTERN = re.compile("\ue000(\\d+)\ue001")


def chat_pieces(
    tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_markup) pieces: the template's markup, and each message's
    content as the user wrote it, so that only markup may hold special tokens.

    The template is rendered a second time with each content replaced by a mark; the marks give
    where each content sits, checked by putting the contents back (as written, or stripped, as
    templates that `trim` them do) and comparing with the real rendering.
    """
    template = chat_template(tokenizer)
    messages, tools = template_inputs(messages, tools, template)
    _refuse_control_tokens(tokenizer, messages, tools)
    render = functools.partial(
        render_chat,
        template=template,
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        tools=tools,
    )
    rendered = render(messages)
    try:
        skeleton = render(
            [
                {**message, "content": _CONTENT_MARK.format(i)} if message["content"] else message
                for i, message in enumerate(messages)
            ]
        )
    except LmforgeError:
        skeleton = None  # the template looks inside contents; fall through to the check below
    for transform in (str, str.strip):
        if skeleton is None:
            break
        pieces, last = [], 0
        for match in _CONTENT_MARK_PATTERN.finditer(skeleton):
            index = int(match.group(1))
            if index >= len(messages) or not messages[index]["content"]:
                continue
            pieces += [(skeleton[last : match.start()], True), (transform(messages[index]["content"]), False)]
            last = match.end()
        pieces.append((skeleton[last:], True))
        if "".join(text for text, _ in pieces) == rendered:
            return [piece for piece in pieces if piece[0]]
    for index, message in enumerate(messages):
        forged = _control_token_in(tokenizer, message["content"] or "")
        if forged is not None:
            raise LmforgeError(
                f"message {index}: its content contains the control token {forged!r}, and this model's chat "
                "template changes message text in a way that cannot be told apart from its own markup; "
                "remove the token from the message"
            )
    return [(rendered, True)]


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
) -> list[int]:
    """Prompt ids of a conversation offering `tools` (OpenAI function definitions): special tokens from
    the template's markup only, message contents as plain text (a user cannot forge a turn by typing
    '<|im_end|>')."""
    return tokenizer.encode_marked(chat_pieces(tokenizer, messages, add_generation_prompt, tools))


def template_inputs(messages: list[dict], tools: list[dict] | None, template: str) -> tuple[list[dict], list | None]:
    """The messages and tools a template renders. One that takes tools gets them, and the history's
    calls with their arguments as mappings (as transformers' callers pass them); one that does not
    gets the fallback prompt and the calls and results written as text (`with_fallback_tools`)."""
    has_calls = any(message.get("tool_calls") for message in messages)
    if not takes_tools(template):
        return (with_fallback_tools(messages, tools) if tools or has_calls else messages), None
    if has_calls:
        messages = [
            {
                **message,
                "tool_calls": [
                    {
                        **call,
                        "function": {
                            **call["function"],
                            "arguments": history_call_arguments(call["function"]["arguments"]),
                        },
                    }
                    for call in message["tool_calls"]
                ],
            }
            if message.get("tool_calls")
            else message
            for message in messages
        ]
    return messages, tools


def _control_token_in(tokenizer: Tokenizer, text: str) -> str | None:
    return next((token for token in tokenizer.special_tokens if token and token in text), None)


def _refuse_control_tokens(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None) -> None:
    """Tool definitions and the history's calls are written into the template's markup, where a
    control token would be one: refuse them there, as no model would write one into a call."""
    for index, tool in enumerate(tools or []):
        if forged := _control_token_in(tokenizer, json.dumps(tool, ensure_ascii=False)):
            raise LmforgeError(f"tools[{index}] contains the control token {forged!r}; remove it")
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            if forged := _control_token_in(tokenizer, json.dumps(call, ensure_ascii=False)):
                raise LmforgeError(f"message {index}: a tool call contains the control token {forged!r}; remove it")


def chat_template(tokenizer: Tokenizer) -> str:
    """The template a conversation with this model is rendered with: its own, else ChatML where the
    tokenizer has ChatML's tokens (lmforge's own models), else the plain one (said once per process)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if all(token in tokenizer.special_tokens for token in (CHAT_START, CHAT_END)):
        return CHATML_TEMPLATE
    _say_plain_template()
    return PLAIN_TEMPLATE


@functools.cache
def _say_plain_template() -> None:
    print(
        "(this model has no chat template: it is a base model; the conversation is written as plain "
        "'User: ...' / 'Assistant: ...' lines)",
        file=sys.stderr,
    )


def chat_stop_strings(tokenizer: Tokenizer) -> list[str]:
    """Text that ends a reply besides the stop tokens: the plain template's next user line."""
    return [PLAIN_TEMPLATE_STOP] if chat_template(tokenizer) == PLAIN_TEMPLATE else []


@dataclass
class ChatSession:
    """A conversation with a model: history in, streamed reply out."""

    model: Transformer
    tokenizer: Tokenizer
    system_prompt: str | None = None
    # `lmforge chat` sets the model's own defaults (`lmforge.formats.loading.sampling_defaults`)
    sampling: SamplingConfig = field(default_factory=lambda: fallback_sampling(chat_model=True))
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.history

    def reply(self, user_text: str):
        """Stream the assistant's reply to `user_text`. The exchange joins the history once the reply is
        complete; one stopped midway (Ctrl-C, or the caller leaving the stream) is dropped, question and
        half answer both, so the model never takes a cut-off answer for its own."""
        question = {"role": "user", "content": user_text}
        prompt = encode_chat(self.tokenizer, self.messages() + [question])
        sampling = self.sampling
        if stops := chat_stop_strings(self.tokenizer):
            sampling = replace(sampling, stop=[*(sampling.stop or []), *stops])
        pieces: list[str] = []
        for piece in generate(
            self.model, self.tokenizer, prompt, sampling, stop_token_ids=stop_token_ids(self.tokenizer)
        ):
            pieces.append(piece)
            yield piece
        self.history += [question, {"role": "assistant", "content": "".join(pieces)}]

    def reset(self) -> None:
        self.history.clear()


HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def chat_loop(session: ChatSession, input_fn=input, output=sys.stdout) -> None:
    """Interactive terminal chat. Ctrl-C stops a reply (the exchange is not kept) and keeps the session;
    Ctrl-D or /exit leaves."""
    output.write(f"{HELP}\n")
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            output.write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            session.system_prompt = text[len("/system") :].strip() or None
            session.reset()
            output.write(f"(system prompt {'set' if session.system_prompt else 'cleared'}; conversation cleared)\n")
            continue
        if text.startswith("/"):
            output.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        output.write("assistant> ")
        try:
            for piece in session.reply(text):
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            output.write(" [stopped; this exchange is not kept]")
        output.write("\n")
