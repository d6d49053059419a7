import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError
from lmforge.tokenizer import EOS, BPETokenizer, CharTokenizer, load_tokenizer, train_tokenizer

from .conftest import make_corpus

TRAINING_TEXT = make_corpus(200) + "Ünïcödé façade — naïve café 日本語 🙂\n"


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([TRAINING_TEXT], vocab_size=400)


@pytest.fixture(scope="module")
def char():
    return CharTokenizer.train([TRAINING_TEXT])


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_char_round_trip_any_unicode(text):
    tokenizer = CharTokenizer.train([TRAINING_TEXT])
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges(bpe):
    ids = bpe.encode("the king my lord")
    assert len(ids) < len("the king my lord")  # common words became single tokens
    assert bpe.vocab_size == 400


def test_char_unseen_characters_fall_back_to_bytes(char):
    ids = char.encode("a€")
    assert len(ids) == 1 + len("€".encode())
    assert char.decode(ids) == "a€"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    tokenizer = train_tokenizer(kind, [TRAINING_TEXT], vocab_size=300)
    tokenizer.chat_template = "{{ messages }}"
    tokenizer.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.kind == kind
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(TRAINING_TEXT) == tokenizer.encode(TRAINING_TEXT)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert loaded.chat_template == "{{ messages }}"


def test_bpe_files_with_the_hf_json_nested_as_an_object_still_load(tmp_path):
    tokenizer = train_tokenizer("bpe", [TRAINING_TEXT], vocab_size=300)
    tokenizer.save(tmp_path / "tok.json")
    document = json.loads((tmp_path / "tok.json").read_text())
    assert isinstance(document["hf_tokenizer"], str)  # one string: parsed in Rust, not as Python objects
    document["hf_tokenizer"] = json.loads(document["hf_tokenizer"])  # the layout files had before
    (tmp_path / "old.json").write_text(json.dumps(document))
    assert load_tokenizer(tmp_path / "old.json").encode(TRAINING_TEXT) == tokenizer.encode(TRAINING_TEXT)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_tokens_have_ids_and_decode(kind):
    tokenizer = train_tokenizer(kind, [TRAINING_TEXT], vocab_size=300)
    ids = {
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
        tokenizer.token_to_id("<|im_start|>"),
        tokenizer.token_to_id("<|im_end|>"),
    }
    assert None not in ids and len(ids) == 5
    assert tokenizer.decode([tokenizer.eos_id]) == EOS


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_token_byte_lengths_add_up_to_utf8_size(kind):
    tokenizer = train_tokenizer(kind, [TRAINING_TEXT], vocab_size=300)
    lengths = tokenizer.token_byte_lengths()
    text = "Ünïcödé — the king 🙂 ok"
    assert sum(int(lengths[i]) for i in tokenizer.encode(text)) == len(text.encode("utf-8"))
    assert lengths[tokenizer.eos_id] == 0


def test_bpe_vocab_too_small_is_a_clear_error():
    with pytest.raises(LmforgeError, match="at least 261"):
        BPETokenizer.train([TRAINING_TEXT], vocab_size=100)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(LmforgeError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LmforgeError, match="bad.json"):
        load_tokenizer(bad)
    other = tmp_path / "other.json"
    other.write_text('{"model": {}}')
    with pytest.raises(LmforgeError, match="not an lmforge tokenizer"):
        load_tokenizer(other)


def test_document_marks_as_the_model_files_ask(tmp_path):
    """add_bos_token / add_eos_token (GGUF, tokenizer.json): a BOS first unless one is there, an EOS last."""
    tokenizer = CharTokenizer("abc")
    ids = tokenizer.encode("ab")
    assert tokenizer.with_document_marks(ids) == ids  # lmforge's own models: nothing added
    tokenizer.add_bos_token = True
    assert tokenizer.with_document_marks(ids) == [tokenizer.bos_id, *ids]
    assert tokenizer.with_document_marks([tokenizer.bos_id, *ids]) == [tokenizer.bos_id, *ids]  # never doubled
    assert tokenizer.document_start_id == tokenizer.bos_id != tokenizer.eos_id
    tokenizer.add_eos_token = True
    tokenizer.end_of_turn_tokens = ("<|im_end|>",)
    assert tokenizer.with_document_marks(ids) == [tokenizer.bos_id, *ids, tokenizer.eos_id]
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert (loaded.add_bos_token, loaded.add_eos_token, loaded.end_of_turn_tokens) == (True, True, ("<|im_end|>",))
