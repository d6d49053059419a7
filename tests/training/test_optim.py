"""One optimizer builder: every entry point decays exactly the ≥2-D trainable weights."""

import pytest
import torch
from torch import nn

from lmforge.training import fit, pretrain
from lmforge.training.optim import build_optimizer

from ..finetune.test_classify import TOKENIZER as CLASSIFY_TOKENIZER
from ..finetune.test_classify import sentiment_table, tiny_decoder
from ..finetune.test_sft import chat_file, tiny_checkpoint
from .test_pretrain import tiny_config


class Built(Exception):
    """Raised by the spy once the optimizer exists: the entry point needs to go no further."""


def run_pretraining(tmp_path, char_dataset):
    pretrain.train(tiny_config(char_dataset, tmp_path / "run"))


def run_fit_compile(tmp_path, char_dataset):
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    fit.compile(model, "adamw", "sparse_categorical_crossentropy", from_logits=True)


def run_sft(tmp_path, char_dataset):
    from lmforge.finetune.sft import SFTConfig, finetune_chat

    base, data = tiny_checkpoint(tmp_path / "base"), chat_file(tmp_path / "chats.jsonl")
    config = SFTConfig(data=str(data), model=str(base), out=str(tmp_path / "out"), max_tokens=256, weight_decay=0.1)
    finetune_chat(config, verbose=0)


def run_classify(tmp_path, char_dataset):
    from lmforge.finetune.classify import ClassifyConfig, finetune_classifier
    from lmforge.formats.checkpoint import save_model

    checkpoint = save_model(tmp_path / "base", tiny_decoder(), CLASSIFY_TOKENIZER)
    data = sentiment_table(tmp_path / "train.csv")
    finetune_classifier(ClassifyConfig(data=str(data), model=str(checkpoint), out=str(tmp_path / "out")), verbose=0)


def run_recommend(tmp_path, char_dataset):
    from lmforge.apps.recommend import RecommendConfig, synthetic_interactions, train_recommender, write_interactions

    log = write_interactions(synthetic_interactions(users=20, items=20, clusters=2, seed=0), tmp_path / "log.csv")
    train_recommender(RecommendConfig(data=str(log), out=str(tmp_path / "out"), d_model=16, n_layers=1), verbose=0)


def run_vision(tmp_path, char_dataset):
    from lmforge.apps.vision import VisionTransformer, ViTConfig, train_classifier

    train_classifier(VisionTransformer(ViTConfig()), torch.rand(8, 1, 8, 8), torch.arange(8), verbose=0)


@pytest.mark.parametrize(
    "entry_point", [run_pretraining, run_fit_compile, run_sft, run_classify, run_recommend, run_vision]
)
def test_every_entry_point_decays_exactly_the_matrices(entry_point, tmp_path, char_dataset, monkeypatch):
    built = []

    def spy(model, *args, **options):
        built.append((model, build_optimizer(model, *args, **options)))
        raise Built

    for module in (pretrain, fit):
        monkeypatch.setattr(module, "build_optimizer", spy)
    with pytest.raises(Built):
        entry_point(tmp_path, char_dataset)
    [(model, optimizer)] = built
    decayed = [p for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]]
    undecayed = [p for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]]
    assert decayed and all(p.dim() >= 2 for p in decayed)
    assert all(p.dim() < 2 for p in undecayed)  # some models (bias-free, gain-free norms) have none
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(map(id, decayed + undecayed)) == sorted(trainable)


def test_named_optimizers_keep_the_rule_and_take_their_options():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    rmsprop = build_optimizer(model, 0.1, 0.5, "rmsprop", alpha=0.9)
    assert isinstance(rmsprop, torch.optim.RMSprop) and rmsprop.param_groups[0]["alpha"] == 0.9
    assert [group["weight_decay"] for group in rmsprop.param_groups] == [0.5, 0.0]
    assert [len(group["params"]) for group in rmsprop.param_groups] == [1, 3]  # the weight; bias, gain, norm bias
    model[0].weight.requires_grad_(False)
    frozen = build_optimizer(model, 0.1, 0.5)
    assert [len(group["params"]) for group in frozen.param_groups] == [0, 3]
