"""Chat: templates rendered with Jinja (the model's own, or ChatML), history, and the terminal loop."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime

from lmforge.errors import LmforgeError
from lmforge.generate import SamplingConfig, generate
from lmforge.model import Transformer
from lmforge.tokenizer import CHAT_END, Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


def render_chat(
    messages: list[dict],
    template: str | None = None,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """The prompt text for `messages` ({'role', 'content'} dicts), as HF's apply_chat_template renders it."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise LmforgeError(f"message {index}: needs a role in {ROLES} and string content, got {message!r}")

    def raise_exception(text: str):
        raise LmforgeError(f"chat template: {text}")

    # Sandboxed: a template comes with a downloaded model and must not reach Python internals.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return environment.from_string(template or CHATML_TEMPLATE).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except TemplateError as error:
        raise LmforgeError(f"chat template failed: {error}") from None


def stop_token_ids(tokenizer: Tokenizer) -> set[int]:
    """Tokens that end an assistant turn: end-of-text and ChatML's <|im_end|>."""
    ids = {tokenizer.eos_id, tokenizer.token_to_id(CHAT_END)}
    return {i for i in ids if i is not None}


@dataclass
class ChatSession:
    """A conversation with a model: history in, streamed reply out."""

    model: Transformer
    tokenizer: Tokenizer
    system_prompt: str | None = None
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=512, temperature=0.2, top_p=0.9, repetition_penalty=1.1)
    )
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.history

    def reply(self, user_text: str):
        """Stream the assistant's reply to `user_text`; the turn joins the history as far as it got."""
        self.history.append({"role": "user", "content": user_text})
        prompt = render_chat(
            self.messages(), self.tokenizer.chat_template, True, self.tokenizer.bos_token, self.tokenizer.eos_token
        )
        pieces: list[str] = []
        try:
            for piece in generate(
                self.model, self.tokenizer, prompt, self.sampling, stop_token_ids=stop_token_ids(self.tokenizer)
            ):
                pieces.append(piece)
                yield piece
        finally:
            self.history.append({"role": "assistant", "content": "".join(pieces)})

    def reset(self) -> None:
        self.history.clear()


HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def chat_loop(session: ChatSession, input_fn=input, output=sys.stdout) -> None:
    """Interactive terminal chat. Ctrl-C stops a reply and keeps the session; Ctrl-D or /exit leaves."""
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
            output.write(" [stopped]")
        output.write("\n")
