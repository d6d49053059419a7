import io

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.inference import chat as chat_module
from lmforge.inference.chat import CHATML_TEMPLATE, ChatSession, chat_loop, render_chat, stop_token_ids
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def session_parts():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .\n")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layers=1, n_heads=2, d_model=16)
    ).eval()
    return model, tokenizer


def test_chatml_default_template():
    text = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith("assistant\n")


def test_model_template_with_helpers():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    assert (
        render_chat([{"role": "user", "content": "x"}], template, bos_token="<s>", eos_token="</s>")
        == "<s>[user] x</s>"
    )
    with pytest.raises(LmforgeError, match="chat template: no tools"):
        render_chat([{"role": "tool", "content": "x"}], template)


def test_templates_are_sandboxed():
    with pytest.raises(LmforgeError, match="chat template failed"):
        render_chat([{"role": "user", "content": "x"}], "{{ messages.__class__.__mro__[1].__subclasses__() }}")


@pytest.mark.parametrize("message", [{"role": "wizard", "content": "x"}, {"role": "user", "content": 5}, "hello"])
def test_bad_messages_are_rejected(message):
    with pytest.raises(LmforgeError, match="message 0"):
        render_chat([message])


def test_session_keeps_history_and_system_prompt(session_parts):
    model, tokenizer = session_parts
    session = ChatSession(model, tokenizer, system_prompt="be kind")
    session.sampling.max_new_tokens = 5
    reply = "".join(session.reply("hello"))
    assert session.messages() == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": reply},
    ]
    session.reset()
    assert session.messages() == [{"role": "system", "content": "be kind"}]
    assert stop_token_ids(tokenizer) == {tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")}


def test_terminal_loop_commands_and_ctrl_c(session_parts, monkeypatch):
    model, tokenizer = session_parts
    session = ChatSession(model, tokenizer)

    def interrupted_generate(*args, **kwargs):
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_module, "generate", interrupted_generate)
    lines = iter(["", "/system talk like a pirate", "first question", "/bogus", "/reset", "second", "/exit", "never"])
    output = io.StringIO()
    chat_loop(session, input_fn=lambda prompt: next(lines), output=output)
    text = output.getvalue()
    assert "system prompt set" in text and "unknown command /bogus" in text and "conversation cleared" in text
    assert text.count("partial [stopped; this exchange is not kept]") == 2  # Ctrl-C ended each reply, not the session
    assert session.system_prompt == "talk like a pirate"
    assert session.history == []  # the stopped exchange ("second") was dropped, question and half answer
    assert next(lines) == "never"  # /exit left the loop


def test_a_stopped_reply_leaves_the_history_as_it_was(session_parts):
    session = ChatSession(*session_parts)
    session.sampling.max_new_tokens, session.sampling.temperature = 4, 0
    complete = "".join(session.reply("hello"))
    before = list(session.history)
    stream = session.reply("tell me more")
    assert next(stream)  # greedy: this model writes text before any end-of-text
    stream.close()  # the caller stopped reading: Ctrl-C in the terminal, Stop on the page
    assert (
        session.history
        == before
        == [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": complete},
        ]
    )


def test_end_of_input_leaves_the_loop(session_parts):
    def no_more_input(prompt):
        raise EOFError

    chat_loop(ChatSession(*session_parts), input_fn=no_more_input, output=io.StringIO())


def test_chatml_constant_is_what_smollm_uses():
    assert "<|im_start|>" in CHATML_TEMPLATE and "add_generation_prompt" in CHATML_TEMPLATE


def test_chat_command_confirms_the_adapter_and_starts_from_the_model_defaults(tmp_path, monkeypatch, capsys):
    import json

    from lmforge.cli import main
    from lmforge.finetune.lora import LoraConfig, apply_lora, save_adapter
    from lmforge.formats.checkpoint import save_model
    from lmforge.inference.generate import SamplingConfig

    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .\n")
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layers=2, n_heads=2, d_model=16))
    folder = save_model(tmp_path / "model", model, tokenizer)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.35, "top_k": 7}))
    save_adapter(apply_lora(model, LoraConfig(rank=2, targets=("qkv", "down"))), tmp_path / "adapter")
    sessions = []
    monkeypatch.setattr(chat_module, "chat_loop", sessions.append)
    assert main(["chat", str(folder), "--adapter", str(tmp_path / "adapter"), "--max_new_tokens=9"]) == 0
    err = capsys.readouterr().err
    assert f"applied adapter {tmp_path / 'adapter'}: LoRA rank 2 (alpha 16) on 4 layers (qkv, down)" in err
    # the file's settings over the base-model fallback (no chat template), then the command line's
    assert sessions[0].sampling == SamplingConfig(max_new_tokens=9, temperature=0.35, top_k=7)
    assert "sampling: temperature 0.35, top_k 7, max_new_tokens 9" in err
