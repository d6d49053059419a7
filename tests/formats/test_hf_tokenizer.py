"""HF folders' tokenizers: tokenizer.json with what tokenizer_config.json, chat_template.jinja and
generation_config.json say, checked against transformers' AutoTokenizer on the same folder."""

import json

import pytest

from lmforge.formats.hf import read_hf_tokenizer
from lmforge.inference.chat import encode_chat, stop_token_ids
from lmforge.tokenizer import BPETokenizer

from ..conftest import make_corpus

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", "Съешь ещё булок 我能吞下玻璃 أنا قادر 😀", "def f(x):\n    return x  \n\n\n", "   spaces"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_folder(folder, settings: dict, bos_by_post_processor: bool, generation: dict | None = None):
    from tokenizers import processors

    tokenizer = BPETokenizer.train([make_corpus(100)], vocab_size=300)
    if bos_by_post_processor:  # as Llama's and Gemma's tokenizer.json do
        bos = tokenizer.bos_token
        tokenizer.hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_id)]
        )
    folder.mkdir()
    tokenizer.hf.save(str(folder / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|endoftext|>",
    } | settings
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.mark.parametrize(
    "settings, post_processor, adds_bos",
    [
        ({}, True, True),
        ({}, False, False),
        ({"add_bos_token": False}, True, True),
        ({"add_bos_token": True}, False, False),
    ],
    ids=["bos-from-post-processor", "no-bos", "post-processor-over-flag", "no-post-processor-over-flag"],
)
def test_plain_text_gets_the_ids_transformers_gives(tmp_path, settings, post_processor, adds_bos):
    folder = write_folder(tmp_path / "model", settings, post_processor)
    ours = read_hf_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.add_bos_token is adds_bos
    for text in TEXTS:
        expected = theirs(text).input_ids
        assert ours.with_document_marks(ours.encode(text)) == expected, text
        assert ours.with_document_marks(ours.encode(text))[:1] != [ours.bos_id] * 2


def test_chat_template_from_chat_template_jinja_and_eos_list_from_generation_config(tmp_path):
    folder = write_folder(
        tmp_path / "model", {}, True, generation={"eos_token_id": [1, 4], "bos_token_id": 0, "do_sample": False}
    )
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    ours = read_hf_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.chat_template == theirs.chat_template == TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # The template writes the BOS itself; transformers tokenizes its output without adding another.
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_chat(ours, messages) == list(expected)
    assert ours.end_of_turn_tokens == (theirs.convert_ids_to_tokens(4),)  # id 1 is eos already
    assert stop_token_ids(ours) >= {1, 4}


def test_named_templates_in_tokenizer_config_take_the_default(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": TEMPLATE}]
    folder = write_folder(tmp_path / "model", {"chat_template": named}, False)
    assert read_hf_tokenizer(folder).chat_template == TEMPLATE


def test_end_of_turn_tokens_survive_an_hf_export(tmp_path):
    from lmforge.formats.hf import save_hf
    from lmforge.model import ModelConfig, Transformer

    tokenizer = BPETokenizer.train([make_corpus(100)], vocab_size=300)
    tokenizer.end_of_turn_tokens = ("<|im_end|>",)
    model = Transformer(ModelConfig(vocab_size=300, block_size=32, n_layers=1, n_heads=2, d_model=16))
    folder = save_hf(model, tokenizer, tmp_path / "model")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")]
    assert read_hf_tokenizer(folder).end_of_turn_tokens == ("<|im_end|>",)
