"""GGUF vocabularies (SentencePiece `llama`, byte-level `gpt2` with each family's pre-tokenizer) give the
ids of the references built from the same file: llama.cpp, and sentencepiece / transformers."""

import io
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.formats.gguf import CONTROL, PRE_TOKENIZER_SPLITS, USER_DEFINED, open_gguf, read_tokenizer

gguf = pytest.importorskip("gguf")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm here, you're there; they've gone.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "我能吞下玻璃而不伤身体。你好世界，今天天气很好。",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني.",
    "def main():\n    for i in range(10):\n        print(i)  # loop 12345\n",
    "    spaces   and\n\n\nnewlines\t\ttabs 😀 👍🏽",
]
TEXTS = [
    "Hello world, the quick fox",
    "two  spaces   three\n\nnewlines\n",
    "Съешь ещё булок",
    "我能吞下玻璃 你好",
    "أنا قادر",
    "emoji 😀👍🏽 ok 🦙",
    "def f(x):\n    return x**2  # 1234567\n",
    "\t\ttabs and CamelCase don't",
    "caffè naïve résumé",
    "trailing ",
    "x <think> y",
]


def write_vocabulary(path: Path, architecture: str, **tokenizer) -> Path:
    """A GGUF holding only a vocabulary (and the hyperparameters llama.cpp reads before it)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in tokenizer.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_ids(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40),
        model_writer=model,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<think>"],
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_vocabulary(model: bytes) -> dict:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    tokens, scores, types = [], [], []
    for index in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(index))
        scores.append(processor.get_score(index))
        if processor.is_unknown(index):
            types.append(2)
        elif processor.is_control(index):
            types.append(CONTROL)
        elif processor.is_byte(index):
            types.append(6)
        else:
            types.append(USER_DEFINED if tokens[-1] == "<think>" else 1)
    return dict(tokenizer_model="llama", token_list=tokens, token_scores=scores, token_types=types)


def test_sentencepiece_vocabulary_gives_the_ids_of_sentencepiece_and_llama_cpp(tmp_path, sentencepiece_model):
    import sentencepiece

    path = write_vocabulary(
        tmp_path / "spm.gguf",
        "llama",
        **sentencepiece_vocabulary(sentencepiece_model),
        bos_token_id=1,
        eos_token_id=2,
        add_bos_token=True,
    )
    ours = read_tokenizer(open_gguf(path), path)
    reference = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
    llama_cpp = llama_cpp_ids(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == llama_cpp(text), text
        if "<think>" not in text:  # llama.cpp puts a prefix space after a user-defined token; sentencepiece not
            assert ids == reference.encode(text), text
            assert ours.decode(ids) == text
    assert ours.encode(" leading  spaces") == llama_cpp(" leading  spaces") == reference.encode(" leading  spaces")
    assert ours.add_bos_token and ours.with_document_marks(ours.encode("hi"))[0] == ours.bos_id


def test_gemma_vocabulary_gives_the_ids_of_transformers(tmp_path, sentencepiece_model):
    """Gemma's converter stores space-run tokens with real spaces and no prefix space (Gemma 3), and its
    merges follow the file's order, not the scores: transformers' GGUF reader is the reference here."""
    transformers = pytest.importorskip("transformers")
    vocabulary = sentencepiece_vocabulary(sentencepiece_model)
    vocabulary["token_list"] = [
        " " * len(t) if len(t) > 1 and not t.strip("▁") else t for t in vocabulary["token_list"]
    ]
    vocabulary["token_scores"] = [0.0] * len(vocabulary["token_list"])  # Gemma's scores say nothing of the order
    path = write_vocabulary(tmp_path / "gemma.gguf", "gemma3", **vocabulary, add_space_prefix=False)
    ours = read_tokenizer(open_gguf(path), path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text


def byte_level_vocabulary(pre: str) -> dict:
    """A tiny byte-level BPE trained with `pre`'s split rule, as a GGUF `gpt2` vocabulary."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(CORPUS * 20, trainer=trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<|endoftext|>", "<think>"]
    return dict(
        tokenizer_model="gpt2",
        tokenizer_pre=pre,
        token_list=tokens,
        token_types=[1] * (len(tokens) - 2) + [CONTROL, USER_DEFINED],
        token_merges=[m if isinstance(m, str) else " ".join(m) for m in model["merges"]],
        eos_token_id=len(tokens) - 2,
    )


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "tekken", "gpt-4o", "gpt-2"])
def test_byte_level_pre_tokenizers_give_the_ids_of_llama_cpp_and_transformers(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    path = write_vocabulary(tmp_path / f"{pre}.gguf", "llama", **byte_level_vocabulary(pre))
    ours = read_tokenizer(open_gguf(path), path)
    llama_cpp = llama_cpp_ids(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS + ["It's 2024: 1234567 apples, HTTPServer's JSON_value\r\n\r\n  x"]:
        ids = ours.encode(text)
        assert ids == llama_cpp(text), text
        if pre != "smollm":  # transformers' GGUF reader has no rule for smollm's digit split
            assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text


def test_an_unknown_pre_tokenizer_is_refused_like_llama_cpp_does(tmp_path):
    vocabulary = byte_level_vocabulary("gpt-2")
    vocabulary["tokenizer_pre"] = "some-new-model"
    path = write_vocabulary(tmp_path / "unknown.gguf", "llama", **vocabulary)
    with pytest.raises(LmforgeError, match="'some-new-model' is not a pre-tokenizer lmforge knows"):
        read_tokenizer(open_gguf(path), path)


def test_end_of_turn_ids_and_bos_flags_come_from_the_file(tmp_path):
    vocabulary = byte_level_vocabulary("qwen2")
    think = len(vocabulary["token_list"]) - 1
    path = write_vocabulary(tmp_path / "flags.gguf", "llama", **vocabulary, eot_token_id=think, add_bos_token=False)
    ours = read_tokenizer(open_gguf(path), path)
    assert ours.end_of_turn_tokens == ("<think>",)
    assert not ours.add_bos_token and ours.with_document_marks([5]) == [5]


def rewritten(tokenizer, path: Path) -> Path:
    """`tokenizer` written back as a GGUF vocabulary by lmforge's exporter."""
    from lmforge.formats.gguf import _write_tokenizer

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(
        context_length=64, embedding_length=8, block_count=1, feed_forward_length=8, head_count=1
    ).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    _write_tokenizer(writer, tokenizer, tokenizer.vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["sentencepiece", "qwen2", "smollm", "llama-bpe"])
def test_export_keeps_the_vocabulary_and_its_ids(tmp_path, sentencepiece_model, kind):
    """SentencePiece vocabularies go back out as `llama` with scores that give the same merges; byte-level
    ones keep their pre-tokenizer's name (a Qwen or Llama 3 file written as gpt-2 would split text differently)."""
    if kind == "sentencepiece":
        vocabulary = dict(sentencepiece_vocabulary(sentencepiece_model), bos_token_id=1, eos_token_id=2)
    else:
        vocabulary = byte_level_vocabulary(kind)
    original_path = write_vocabulary(tmp_path / "original.gguf", "llama", **vocabulary)
    original = read_tokenizer(open_gguf(original_path), original_path)
    copy_path = rewritten(original, tmp_path / "copy.gguf")
    copy = read_tokenizer(open_gguf(copy_path), copy_path)
    fields = open_gguf(copy_path).fields
    assert fields["tokenizer.ggml.pre" if kind != "sentencepiece" else "tokenizer.ggml.model"] == (
        kind if kind != "sentencepiece" else "llama"
    )
    assert fields["tokenizer.ggml.token_type"] == vocabulary["token_types"]
    llama_cpp = llama_cpp_ids(copy_path)
    for text in TEXTS:
        assert copy.encode(text) == original.encode(text) == llama_cpp(text), text


@pytest.mark.parametrize("architecture", ["phi3", "llama"])
def test_sentencepiece_vocabulary_gives_the_ids_of_transformers(tmp_path, sentencepiece_model, architecture):
    """transformers reads a `phi3` file with the prefix space as a normalizer, as llama.cpp and lmforge do; a
    `llama` one with Metaspace, which differs only where a text starts with a space or follows a
    user-defined token (there lmforge keeps llama.cpp's and sentencepiece's ids)."""
    transformers = pytest.importorskip("transformers")
    vocabulary = sentencepiece_vocabulary(sentencepiece_model)
    path = write_vocabulary(tmp_path / "spm.gguf", architecture, **vocabulary, bos_token_id=1, eos_token_id=2)
    ours = read_tokenizer(open_gguf(path), path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = TEXTS + ["  two leading spaces", " one"] if architecture == "phi3" else TEXTS[:-1]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text


def test_chat_prompt_ids_equal_llama_cpp_on_the_rendered_template(tmp_path, sentencepiece_model):
    """Control tokens from the template's markup, a prefix space after each (llama.cpp's SentencePiece rule)."""
    from lmforge.inference.chat import encode_chat, render_chat

    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    vocabulary = sentencepiece_vocabulary(sentencepiece_model)
    path = write_vocabulary(
        tmp_path / "chat.gguf", "llama", **vocabulary, bos_token_id=1, eos_token_id=2, chat_template=template
    )
    ours = read_tokenizer(open_gguf(path), path)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    messages = [
        {"role": "user", "content": "Съешь ещё булок"},
        {"role": "assistant", "content": "我能吞下玻璃"},
        {"role": "user", "content": "def f(x):\n    return x"},
    ]
    rendered = render_chat(messages, ours.chat_template, bos_token=ours.bos_token, eos_token=ours.eos_token)
    assert encode_chat(ours, messages) == llm.tokenize(rendered.encode(), add_bos=False, special=True)
