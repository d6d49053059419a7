"""Grammar-constrained decoding: the tokenizer's bytes as llguidance reads them, the settings' checks, and the
output following a JSON Schema or a Lark grammar in every decode path (native kernels, PyTorch, compiled,
batched); then the shipped SmolLM2 sampling at temperature 1 under three schemas, every reply validated."""

import json
import re
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.loading import load
from lmforge.inference import constrained, engine
from lmforge.inference.chat import encode_chat, stop_token_ids
from lmforge.inference.constrained import GrammarMatcher, TokenMasks
from lmforge.inference.generate import SamplingConfig, generate, generate_batch, generate_tokens
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES, lark_json
from lmforge.tokenizer import BPETokenizer, CharTokenizer, token_bytes

from ..conftest import skip_without_smollm2

jsonschema = pytest.importorskip("jsonschema")

TEXT = 'Hello {"a": [1, 2.5]} ça va? 日本 🙂\n\ttabs'
SMALL = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer", "count"],
    "additionalProperties": False,
}
LARK = 'start: "<pick>" choice "</pick>"\nchoice: "red" | "green" | "blue"'


def test_token_bytes_of_a_char_tokenizer_spell_the_text():
    tokenizer = CharTokenizer("abc Hel")
    pieces, special = token_bytes(tokenizer)
    assert b"".join(pieces[token] for token in tokenizer.encode(TEXT)) == TEXT.encode()
    assert [pieces[index] for index in special] == [token.encode() for token in tokenizer.special_tokens]


def test_token_bytes_of_a_byte_level_bpe_spell_the_text():
    tokenizer = BPETokenizer.train([TEXT * 3, "plain words and more words"], vocab_size=300)
    pieces, special = token_bytes(tokenizer)
    assert b"".join(pieces[token] for token in tokenizer.encode(TEXT)) == TEXT.encode()
    assert sorted(special) == sorted(tokenizer.token_to_id(token) for token in tokenizer.special_tokens)


def sentencepiece_tokenizer() -> BPETokenizer:
    """SentencePiece-style BPE as lmforge builds it from a Llama GGUF: "▁" for spaces, <0xNN> byte fallback."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "H", "e", "l", "o", "▁H", "ll", "▁Hell"):
        vocab[piece] = len(vocab)
    merges = [("▁", "H"), ("l", "l"), ("e", "ll"), ("▁H", "ell")]
    vocab["ell"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in ("<s>", "</s>")])
    tokenizer = BPETokenizer(hf, ["<unk>", "<s>", "</s>"])
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    return tokenizer


def test_token_bytes_of_a_sentencepiece_bpe_spell_the_text():
    tokenizer = sentencepiece_tokenizer()
    pieces, special = token_bytes(tokenizer)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.token_to_id("▁Hell") in ids and tokenizer.token_to_id("<0xE6>") in ids  # merges and bytes
    # the normalizer puts "▁" (a space) before the text; the decoder strips it again
    assert b"".join(pieces[token] for token in ids) == b" " + TEXT.encode()
    assert sorted(special) == [0, 1, 2]


def test_token_byte_lengths_of_a_sentencepiece_bpe_count_text_bytes():
    # bits per byte divides by these: "▁Hell" is 5 bytes of text (a space and "Hell"), "<0xE6>" one byte
    tokenizer = sentencepiece_tokenizer()
    lengths = tokenizer.token_byte_lengths()
    ids = tokenizer.encode(TEXT)
    assert lengths[tokenizer.token_to_id("▁Hell")] == 5 and lengths[tokenizer.token_to_id("<0xE6>")] == 1
    assert sum(int(lengths[token]) for token in ids) == len(b" " + TEXT.encode())
    assert lengths[tokenizer.eos_id] == 0


def test_a_sentencepiece_tokenizer_drives_a_grammar():
    tokenizer = sentencepiece_tokenizer()
    matcher = GrammarMatcher(tokenizer, SamplingConfig(grammar='start: "Hello!"').constraint())
    for token in ("H", "ell", "o", "<0x21>"):
        matcher.consume(tokenizer.token_to_id(token))
    assert matcher.complete


def test_bad_schemas_and_grammars_are_refused_where_they_are_given():
    with pytest.raises(ValueError, match="json_schema: llguidance cannot use it: .*objekt"):
        SamplingConfig(json_schema={"type": "objekt"})
    with pytest.raises(ValueError, match="grammar: llguidance cannot use it"):
        SamplingConfig(grammar="start: (")
    with pytest.raises(ValueError, match="not both"):
        SamplingConfig(json_schema={"type": "object"}, grammar=LARK)
    with pytest.raises(ValueError, match="must be a JSON Schema object"):
        SamplingConfig(json_schema=["type", "object"])
    assert SamplingConfig().constraint() is None


def test_a_schema_is_compiled_once_however_many_configs_carry_it(monkeypatch):
    import llguidance

    from lmforge import settings

    settings._compiled_grammar.cache_clear()
    validated = []
    real_validate = llguidance.LLMatcher.validate_grammar
    monkeypatch.setattr(
        llguidance.LLMatcher, "validate_grammar", lambda grammar: validated.append(grammar) or real_validate(grammar)
    )
    first = SamplingConfig(json_schema=json.loads(json.dumps(SMALL)))  # equal, not the same dict
    second = SamplingConfig(json_schema=json.loads(json.dumps(SMALL)), temperature=0)
    assert first.constraint() == second.constraint() and len(validated) == 1
    SamplingConfig(grammar=LARK)
    assert len(validated) == 2
    with pytest.raises(ValueError, match="json_schema is not JSON"):
        SamplingConfig(json_schema={"type": "object", "default": object()})


def test_a_constraint_needs_the_tokenizer(model):
    with pytest.raises(LmforgeError, match="need the model's tokenizer"):
        list(generate_tokens(model, [5, 6], SamplingConfig(max_new_tokens=4, json_schema=SMALL)))


def test_masks_set_exactly_the_disallowed_tokens_to_minus_infinity():
    vocab = 70  # the logits are wider than the mask's 64 tokens: the rest is never allowed
    allowed = np.random.default_rng(0).random((2, 64)) < 0.3
    bitmask = np.packbits(allowed, axis=1, bitorder="little").view(np.int32)
    logits = torch.randn(3, vocab)
    masks = TokenMasks(torch.device("cpu"))
    masks.rows, masks.pending = [0, 2], Future()  # row 1 is unconstrained
    masks.pending.set_result(bitmask)
    masked = masks.apply(logits.clone())
    assert torch.equal(masked[1], logits[1])
    for mask_row, row in enumerate([0, 2]):
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[:64] = torch.from_numpy(allowed[mask_row])
        assert torch.equal(masked[row][keep], logits[row][keep])
        assert bool((masked[row][~keep] == float("-inf")).all())


# --- every decode path, on a tiny random model (which, unconstrained, writes noise) ------------------------

JSON_CHARACTERS = 'abcdefghijklmnopqrstuvwxyz0123456789{}[]":,. <>/'


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer(JSON_CHARACTERS)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=96, n_layers=2, n_heads=2, n_kv_heads=1, d_model=32,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    return Transformer(config).eval()


def follows_small_schema(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SMALL)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def counting(monkeypatch, name: str) -> list[int]:
    """Count the calls of engine.`name` (the decode path that ran)."""
    calls, original = [], getattr(engine, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, name, counted)
    return calls


@pytest.mark.parametrize("path", ["native", "torch"])
def test_generate_tokens_follows_the_schema_and_stops_when_complete(model, tokenizer, path, monkeypatch):
    if path == "native" and not engine.supports(model):
        pytest.skip("the native decode kernels are unavailable here")
    if path == "torch":
        monkeypatch.setattr(engine, "supports", lambda model: False)
    steps = counting(monkeypatch, "decode_step" if path == "native" else "torch_decode_step")
    free = SamplingConfig(max_new_tokens=60, temperature=1.0, seed=1)
    assert not follows_small_schema(tokenizer.decode(generate_tokens(model, [5, 6], free)))
    for seed in range(3):
        sampling = SamplingConfig(max_new_tokens=60, temperature=1.0, seed=seed, json_schema=SMALL)
        tokens = list(generate_tokens(model, [5, 6], sampling, tokenizer=tokenizer))
        assert follows_small_schema(tokenizer.decode(tokens)) and len(tokens) < 60  # ended at the closing brace
    assert steps


@pytest.mark.slow
def test_compiled_decoding_follows_the_schema(model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=60, temperature=1.0, seed=2, json_schema=SMALL)
    assert follows_small_schema(
        tokenizer.decode(generate_tokens(model, [5, 6], sampling, compile=True, tokenizer=tokenizer))
    )


@pytest.mark.parametrize("background", [False, True])
def test_generate_batch_follows_the_schema_in_every_row(model, tokenizer, background, monkeypatch):
    # masks computed in line, and on the helper thread (llguidance's threads for several rows) while the model runs
    monkeypatch.setattr(constrained, "masks_in_background", lambda device: background)
    prompts = [[5, 6], [7, 8, 9, 10], [11]]
    sampling = SamplingConfig(max_new_tokens=60, temperature=1.0, seed=0, json_schema=SMALL)
    outputs = generate_batch(model, prompts, sampling, stop_token_ids(tokenizer), tokenizer)
    assert all(follows_small_schema(tokenizer.decode(row)) for row in outputs)
    greedy = SamplingConfig(max_new_tokens=60, temperature=0, json_schema=SMALL)
    batched = generate_batch(model, prompts, greedy, stop_token_ids(tokenizer), tokenizer)
    alone = [list(generate_tokens(model, prompt, greedy, tokenizer=tokenizer)) for prompt in prompts]
    assert batched == alone


def test_a_lark_grammar_is_followed_and_generate_ends_with_it(model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=4, grammar=LARK)
    text = "".join(generate(model, tokenizer, "ab", sampling))
    assert re.fullmatch("<pick>(red|green|blue)</pick>", text)


def test_a_lark_grammar_can_embed_a_json_schema(model, tokenizer):
    grammar = f'start: "<call>" payload "</call>"\npayload: {lark_json(SMALL)}'
    sampling = SamplingConfig(max_new_tokens=60, temperature=1.0, seed=5, grammar=grammar)
    text = "".join(generate(model, tokenizer, "ab", sampling))
    assert text.startswith("<call>") and text.endswith("</call>")
    assert follows_small_schema(text[len("<call>") : -len("</call>")])


def test_lark_json_lays_out_the_embedded_json_as_json_schema_does(tokenizer):
    grammar = SamplingConfig(grammar=f"start: {lark_json(SMALL)}").constraint()
    for text, follows in [('{"answer": "no", "count": 7}', True), ('{"answer":"no","count":7}', False)]:
        matcher = GrammarMatcher(tokenizer, grammar)
        consumed = all(matcher.matcher.consume_token(token) for token in tokenizer.encode(text))
        assert (consumed and matcher.matcher.is_accepting()) == follows


def test_json_is_written_as_json_dumps_writes_it(tokenizer):
    grammar = SamplingConfig(json_schema={"type": "object", "properties": {"a": {"type": "string"}}}).constraint()
    for text, follows in [
        ('{"a": "x/y\\n"}', True),
        ('{"a":"x"}', False),  # other separators
        ('{\n"a": "x"}', False),  # free whitespace
        ('{"a": "\\u0002"}', False),  # \u escapes
    ]:
        matcher = GrammarMatcher(tokenizer, grammar)
        consumed = all(matcher.matcher.consume_token(token) for token in tokenizer.encode(text))
        assert (consumed and matcher.matcher.is_accepting()) == follows, text


def test_speculative_decoding_refuses_a_constraint(model, tokenizer):
    with pytest.raises(LmforgeError, match="json_schema and grammar are not supported"):
        list(generate(model, tokenizer, "ab", SamplingConfig(temperature=0, json_schema=SMALL), draft=model))


def test_the_tokenizer_index_is_built_once_per_tokenizer(tokenizer):
    assert constrained.guidance_tokenizer(tokenizer) is constrained.guidance_tokenizer(tokenizer)


# --- the shipped SmolLM2 at temperature 1: every sampled reply parses and validates ------------------------

PERSON = {  # nested objects, an array, an enum, integers with bounds
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "address", "hobbies", "role"],
    "additionalProperties": False,
}
ORDER = {  # an array of objects, an enum, a boolean
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "express": {"type": "boolean"},
    },
    "required": ["items", "status", "express"],
    "additionalProperties": False,
}
# Numbers with bounds. A JSON number may have any number of digits, and at temperature 1 SmolLM2 sometimes
# writes a fraction that never ends ("0.1645640457...666"); multipleOf 0.25 (exact in binary, so jsonschema's
# float check is exact too) bounds the digits the way a real schema would.
WEATHER = {
    "type": "object",
    "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 60, "multipleOf": 0.25},
        "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
        "unit": {"enum": ["C", "F"]},
        "readings": {
            "type": "array",
            "items": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
            "maxItems": 3,
        },
    },
    "required": ["temperature", "humidity", "unit", "readings"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "order": ORDER, "weather": WEATHER}


@pytest.fixture(scope="module")
def smollm2():
    skip_without_smollm2()
    return load("smollm2-135m-instruct")


@pytest.mark.parametrize("completions", [pytest.param(50, marks=pytest.mark.slow), 4])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_completions_all_follow_the_schema(smollm2, name, completions):
    """50 completions per schema (4 in the default suite) at temperature 1.0, batched: all parse and validate."""
    model, tokenizer = smollm2
    schema = SCHEMAS[name]
    prompt = encode_chat(tokenizer, [{"role": "user", "content": f"Reply with a JSON object describing a {name}."}])
    sampling = SamplingConfig(max_new_tokens=200, temperature=1.0, seed=0, json_schema=schema)
    stops = stop_token_ids(tokenizer)
    outputs = generate_batch(model, [prompt] * completions, sampling, stops, tokenizer)
    replies = [tokenizer.decode([token for token in row if token not in stops]) for row in outputs]
    for reply in replies:
        jsonschema.validate(json.loads(reply), schema)
    assert len(set(replies)) > 1  # sampled, not one greedy answer
