"""Vision Transformer on the core blocks: shapes, attention maps, a learned task, image folders."""

import io

import pytest
import torch

from lmforge.apps.vision import (
    ProgressOverAllSteps,
    SmallCNN,
    VisionTransformer,
    ViTConfig,
    load_image_folder,
    predict,
    self_attention_weights,
    train_classifier,
)
from lmforge.errors import LmforgeError
from lmforge.evaluation.metrics import confusion_matrix


def test_patchify_keeps_pixels_in_row_major_patches():
    model = VisionTransformer(ViTConfig(image_size=4, patch_size=2, channels=1))
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = model.patchify(image)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 0].tolist() == [0, 1, 4, 5] and patches[0, 3].tolist() == [10, 11, 14, 15]
    assert model(torch.randn(3, 1, 4, 4)).shape == (3, 10)


def test_attention_is_bidirectional_and_rollout_is_a_distribution():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig()).eval()
    images = torch.rand(2, 1, 8, 8)
    weights = self_attention_weights(model.blocks[0], model.blocks[0].attention_norm(model.embed(images)))
    assert weights.shape == (2, 4, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 17))
    assert (weights.triu(1) > 0).any()  # not causal: tokens see later patches too
    rollout = model.attention_rollout(images)
    assert rollout.shape == (2, 4, 4)
    torch.testing.assert_close(rollout.sum(dim=(1, 2)), torch.ones(2))


def test_vit_learns_digits_to_95_percent():
    pytest.importorskip("sklearn")
    from lmforge.apps.vision import load_digits_split

    train_x, train_y, test_x, test_y = load_digits_split()
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(patch_size=4))
    losses = train_classifier(model, train_x, train_y, epochs=30, lr=2e-3)
    assert losses[-1] < losses[0] / 5
    predicted = predict(model, test_x)
    accuracy = (predicted == test_y).float().mean().item()
    assert accuracy >= 0.95, accuracy
    matrix = confusion_matrix(predicted, test_y, 10)
    assert matrix.sum() == len(test_y) and matrix.trace() == (predicted == test_y).sum()


def test_image_folder_loading(tmp_path):
    from PIL import Image

    for name, value in (("dark", 20), ("light", 230)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("L", (10, 12), color=value + i).save(tmp_path / name / f"{i}.png")
    images, labels, classes = load_image_folder(tmp_path, image_size=8, grayscale=True)
    assert classes == ["dark", "light"] and images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images[0].max() < 0.2 and images[-1].min() > 0.85
    model = SmallCNN(1, 2, 8)
    train_classifier(model, images, labels, epochs=40, lr=1e-2)
    assert (predict(model, images) == labels).all()
    (tmp_path / "light" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(LmforgeError, match="broken.png"):
        load_image_folder(tmp_path, image_size=8)


def test_vision_models_take_the_keras_style_fit():
    from lmforge.apps.vision import MLPClassifier, load_digits_split

    train_x, train_y, test_x, test_y = load_digits_split()
    torch.manual_seed(0)
    model = MLPClassifier(64, 10)
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"], from_logits=True, learning_rate=3e-3)
    history = model.fit(train_x, train_y, epochs=8, batch_size=64, validation_data=(test_x, test_y), verbose=0)
    assert history.history["val_accuracy"][-1] > 0.9


def test_train_classifier_shows_fits_progress_bar_unless_told_not_to():
    images, labels = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    shown, silent = io.StringIO(), io.StringIO()
    losses = train_classifier(SmallCNN(1, 3, 8), images, labels, epochs=2, batch_size=16, stream=shown)
    train_classifier(SmallCNN(1, 3, 8), images, labels, epochs=2, batch_size=16, stream=silent, verbose=0)
    assert shown.getvalue().startswith("6/6 ━") and shown.getvalue().endswith(f"loss: {losses[-1]:.4f}\n")
    assert silent.getvalue() == ""


def test_the_progress_over_all_steps_of_a_resumed_run_counts_from_where_it_resumed():
    stream = io.StringIO()
    progress = ProgressOverAllSteps(stream)
    progress.params = {"epochs": 3, "steps": 4}
    progress.on_train_begin({})
    progress.on_epoch_begin(1, {})  # resumed in its second epoch, after 2 of its batches
    progress.on_batch_end(2, {"loss": 0.5})
    progress.on_batch_end(3, {"loss": 0.25})
    progress.on_epoch_begin(2, {})
    progress.on_batch_end(0, {"loss": 0.125})
    assert progress.bar.initial == 6
    progress.on_train_end({"loss": 0.125})
    assert stream.getvalue().startswith("12/12 ━")
