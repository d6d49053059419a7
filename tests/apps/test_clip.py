"""CLIP-style contrastive training: the loss against cross-entropy, embeddings' shapes and norms, and
zero-shot digit classification with caption phrasings training never saw."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.apps import clip
from lmforge.apps.captions import HELD_OUT_PHRASINGS, digit_caption, digit_captions
from lmforge.apps.vision import load_digits_split
from lmforge.errors import LmforgeError


def test_with_distinct_captions_the_loss_is_clips_symmetric_cross_entropy():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(6)
    expected = (
        F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none")
    ) / 2
    assert torch.allclose(clip.contrastive_loss(logits, targets), expected)


def test_a_repeated_caption_counts_every_copy_as_a_match():
    # images 0 and 1 share a caption: each row's target is half on column 0, half on column 1
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([5, 5, 7])
    rows, columns = logits.log_softmax(dim=1), logits.T.log_softmax(dim=1)
    first = (-(rows[0, 0] + rows[0, 1]) / 2 - (columns[0, 0] + columns[0, 1]) / 2) / 2
    last = (-rows[2, 2] - columns[2, 2]) / 2
    loss = clip.contrastive_loss(logits, ids)
    assert loss[0].item() == pytest.approx(first.item()) and loss[2].item() == pytest.approx(last.item())
    # a batch where every image has its own caption and the logits pick it out costs about nothing
    assert clip.contrastive_loss(torch.eye(4) * 100, torch.arange(4)).max() < 1e-6


@pytest.mark.parametrize("image_encoder", ["vit", "cnn"])
def test_embeddings_are_unit_vectors_in_the_shared_space(image_encoder):
    model = clip.CLIPModel(clip.CLIPConfig(image_encoder=image_encoder, embedding_dim=16))
    images = torch.rand(5, 1, 8, 8)
    assert torch.allclose(model.image_embeddings(images).norm(dim=-1), torch.ones(5))
    assert torch.allclose(model.text_embeddings(torch.randn(5, 384)).norm(dim=-1), torch.ones(5))
    logits = model(images, torch.randn(5, 384))
    assert logits.shape == (5, 5) and logits.abs().max() <= 1 / 0.07 + 1e-4


def test_an_unknown_image_encoder_is_refused():
    with pytest.raises(LmforgeError, match="image_encoder"):
        clip.CLIPConfig(image_encoder="resnet")
    with pytest.raises(LmforgeError, match="10 images but 3 captions"):
        clip.train_clip(torch.rand(10, 1, 8, 8), ["a"] * 3, verbose=0)


def test_zero_shot_classifies_held_out_digits_by_held_out_phrasings():
    train_x, train_y, test_x, test_y = load_digits_split()
    captions = digit_captions(train_y, seed=0)  # one training phrasing per image
    model = clip.train_clip(train_x, captions, clip.CLIPConfig(image_encoder="cnn"), epochs=6, verbose=0)
    for phrasing in HELD_OUT_PHRASINGS:
        predicted = clip.zero_shot_classify(model, test_x, [[digit_caption(d, phrasing)] for d in range(10)])
        assert (predicted == test_y).float().mean() > 0.8, phrasing
    ensemble = [[digit_caption(d, phrasing) for phrasing in HELD_OUT_PHRASINGS] for d in range(10)]
    assert clip.zero_shot_logits(model, test_x[:7], ensemble).shape == (7, 10)
