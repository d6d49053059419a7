"""Weight loading: every public path ties the LM head to the embedding iff the config says so."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.checkpoint import load_model, load_weights, model_weights, save_model
from lmforge.formats.hf import load_hf, save_hf
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,?\n")


def trained_looking_model(tie_embeddings: bool) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=TOKENIZER.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16,
        **LLAMA_SWITCHES, tie_embeddings=tie_embeddings,
    )  # fmt: skip
    model = Transformer(config).eval()
    if not tie_embeddings:  # a head unlike the embedding, so a wrongly tied load shows in the logits
        torch.nn.init.normal_(model.lm_head.weight)
    return model


def through_from_state_dict(model, tmp_path):
    return Transformer.from_state_dict(model.config, model_weights(model))


def through_load_weights(model, tmp_path):
    save_model(tmp_path / "checkpoint", model, TOKENIZER)
    loaded = Transformer(model.config)
    load_weights(loaded, tmp_path / "checkpoint")
    return loaded


def through_load_weights_assigned(model, tmp_path):
    save_model(tmp_path / "checkpoint", model, TOKENIZER)
    loaded = Transformer(model.config, init_weights=False)
    load_weights(loaded, tmp_path / "checkpoint", assign=True)
    return loaded


def through_load_model(model, tmp_path):
    return load_model(save_model(tmp_path / "checkpoint", model, TOKENIZER))[0]


def through_hf(model, tmp_path):
    return load_hf(save_hf(model, TOKENIZER, tmp_path / "hf"))[0]


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize(
    "load",
    [through_from_state_dict, through_load_weights, through_load_weights_assigned, through_load_model, through_hf],
)
def test_the_head_is_tied_iff_the_config_says_so_on_every_load_path(tmp_path, load, tie_embeddings):
    model = trained_looking_model(tie_embeddings)
    loaded = load(model, tmp_path).eval()
    head, embedding = loaded.lm_head.weight, loaded.token_embedding.weight
    assert (head is embedding) == tie_embeddings
    assert (head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()) == tie_embeddings
    tokens = torch.tensor([TOKENIZER.encode("hello there")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0])


def test_weights_of_the_wrong_shape_are_named(tmp_path):
    model = trained_looking_model(True)
    save_model(tmp_path / "checkpoint", model, TOKENIZER)
    wider = Transformer(ModelConfig(**{**model.config.to_dict(), "d_model": 32}))
    # Named before torch's own size-mismatch RuntimeError, which would escape the CLI as a traceback.
    with pytest.raises(
        LmforgeError,
        match=r"model\.safetensors: weights do not match the config: .*\(16, 16\) \(the config needs \(32, 32\)\)",
    ):
        load_weights(wider, tmp_path / "checkpoint")


def test_a_save_that_fails_midway_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    old = trained_looking_model(True)
    folder = save_model(tmp_path / "checkpoint", old, TOKENIZER)

    def disk_full(path):
        path.write_text("{")
        raise OSError("No space left on device")

    monkeypatch.setattr(TOKENIZER, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_model(folder, trained_looking_model(False), TOKENIZER)
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint"]
    loaded = load_model(folder)[0]
    assert loaded.config.tie_embeddings
    torch.testing.assert_close(loaded.token_embedding.weight, old.token_embedding.weight)
