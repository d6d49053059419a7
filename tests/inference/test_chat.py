import io
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.inference import chat as chat_module
from lmforge.inference.chat import (
    CHATML_TEMPLATE,
    PLAIN_TEMPLATE,
    ChatSession,
    chat_loop,
    encode_chat,
    render_chat,
    stop_token_ids,
)
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import SamplingConfig
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


# The published chat templates of each family (tokenizer_config.json / chat_template.jinja), rendered by
# transformers' own apply_chat_template machinery as the reference.
TEMPLATES = Path(__file__).parent / "chat_templates"
FAMILY_TOKENS = {  # bos, eos as each family's tokenizer_config.json names them
    "gemma3": ("<bos>", "<eos>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.3": ("<s>", "</s>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "qwen2.5": ("", "<|im_end|>"),
    "qwen3": ("", "<|im_end|>"),
}
CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are terse. Use <b>bold</b> & 'quotes'."},
        {"role": "user", "content": "Hi there!\n  Two lines "},
    ],
    "multi-turn": [
        {"role": "user", "content": "Привет 你好 مرحبا 😀"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "def f(x):\n    return x"},
    ],
    "system, multi-turn, reasoning": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\na1"},
        {"role": "user", "content": "q2"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILY_TOKENS)
def test_real_templates_render_as_transformers_does(family, conversation, add_generation_prompt):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (TEMPLATES / f"{family}.jinja").read_text()
    bos, eos = FAMILY_TOKENS[family]
    messages = CONVERSATIONS[conversation]
    theirs = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
    )[0][0]
    ours = render_chat(messages, template, add_generation_prompt, bos_token=bos, eos_token=eos)
    assert ours == theirs


@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "qwen3"])
def test_tool_results_render_as_transformers_does(family):
    """Llama 3.1 writes a tool's result with tojson: as transformers does, without jinja's HTML escapes."""
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (TEMPLATES / f"{family}.jinja").read_text()
    messages = [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "<temp> is 20 & 'sunny' é"}]
    theirs = render_jinja_template([messages], chat_template=template, add_generation_prompt=True)[0][0]
    assert render_chat(messages, template) == theirs
    assert "<temp> is 20 & 'sunny' é" in theirs


def test_templates_may_use_loop_controls_and_the_generation_tag():
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}"
        "{% continue %}{% endif %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    )
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_chat(messages, template) == "[a]"


def test_gemma_template_refuses_roles_out_of_turn():
    template = (TEMPLATES / "gemma3.jinja").read_text()
    with pytest.raises(LmforgeError, match="chat template: Conversation roles must alternate"):
        render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], template)


def silent_model(vocab_size: int) -> Transformer:
    """A model whose logits are all zero: greedy decoding picks token 0 every step."""
    model = Transformer(ModelConfig(vocab_size=vocab_size, block_size=64, n_layers=1, n_heads=2, d_model=16)).eval()
    torch.nn.init.zeros_(model.lm_head.weight)
    return model


@pytest.mark.parametrize("end_of_turn", ["<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>"])
def test_each_familys_end_of_turn_token_stops_the_reply(end_of_turn):
    tokenizer = CharTokenizer("abc ", special_tokens=[end_of_turn, "<s>", "</s>"])
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer.token_to_id(end_of_turn) == 0 != tokenizer.eos_id
    session = ChatSession(silent_model(tokenizer.vocab_size), tokenizer)
    session.sampling = SamplingConfig(temperature=0.0, max_new_tokens=3)
    assert "".join(session.reply("abc")) == ""
    # the same model, its token 0 not an end of turn: it is written out
    other = CharTokenizer("abc ", special_tokens=["<other>", "<s>", "</s>"])
    other.chat_template, other.eos_token = tokenizer.chat_template, "</s>"
    session = ChatSession(session.model, other, sampling=SamplingConfig(temperature=0.0, max_new_tokens=3))
    assert "".join(session.reply("abc")) == "<other>" * 3


def test_end_of_turn_tokens_named_by_the_files_stop_the_reply():
    tokenizer = CharTokenizer("abc ", special_tokens=["<|my_turn_end|>", "</s>"])
    tokenizer.eos_token, tokenizer.chat_template = "</s>", "{{ messages[0]['content'] }}"
    tokenizer.end_of_turn_tokens = ("<|my_turn_end|>",)  # GGUF eot_token_id, generation_config.json eos list
    assert stop_token_ids(tokenizer) == {0, 1}
    session = ChatSession(silent_model(tokenizer.vocab_size), tokenizer, sampling=SamplingConfig(temperature=0.0))
    assert "".join(session.reply("a")) == ""


def test_a_base_model_chats_through_the_plain_template_and_says_so_once(capsys):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz :\n", special_tokens=["<s>"])
    chat_module._say_plain_template.cache_clear()
    assert chat_module.chat_template(tokenizer) == PLAIN_TEMPLATE
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    assert tokenizer.decode(encode_chat(tokenizer, messages)) == "be kind\n\nUser: hi\nAssistant:"
    encode_chat(tokenizer, messages)
    assert capsys.readouterr().err.count("this model has no chat template") == 1
    assert chat_module.chat_stop_strings(tokenizer) == ["\nUser:"]
    # lmforge's own tokenizers carry ChatML's tokens: they keep ChatML
    assert chat_module.chat_template(CharTokenizer("abc")) == CHATML_TEMPLATE
