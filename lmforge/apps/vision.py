"""Image classification with a Vision Transformer built from the core blocks, plus the baselines
it is compared with (an MLP and a small CNN), data loaders and attention rollout.

ViT (Dosovitskiy et al. 2020): cut the image into patches, project each to a vector, prepend a
learned class token, add learned positions, run the same `Block`s as the language model with
`causal=False`, and classify from the class token. Data: scikit-learn's bundled 8x8 digits
(1,797 images, offline) or any ImageFolder layout (one sub-folder per class) through Pillow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError, missing_extra
from lmforge.model import Block, ModelConfig, make_norm
from lmforge.training import fit
from lmforge.training.fit import Fittable
from lmforge.training.progress import ProgressBar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    classes: int = 10
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 64
    dropout: float = 0.1

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def encoder_config(self) -> ModelConfig:
        """The core block settings: bidirectional, pre-norm LayerNorm, GELU MLP, biases."""
        return ModelConfig(
            vocab_size=1, block_size=self.patches + 1, n_layers=self.n_layers, n_heads=self.n_heads,
            d_model=self.d_model, dropout=self.dropout, causal=False,
        )  # fmt: skip


class VisionTransformer(Fittable, nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"patch size {config.patch_size} does not divide image size {config.image_size}")
        self.config = config
        encoder = config.encoder_config()
        self.patch_embedding = nn.Linear(config.channels * config.patch_size**2, config.d_model)
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.position_embedding = nn.Parameter(torch.randn(1, config.patches + 1, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(encoder, i) for i in range(config.n_layers))
        self.final_norm = make_norm(encoder)
        self.head = nn.Linear(config.d_model, config.classes)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, patches, C * patch * patch), patches in row-major order."""
        p = self.config.patch_size
        batch, channels, height, width = images.shape
        patches = images.reshape(batch, channels, height // p, p, width // p, p)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(self.patchify(images))
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return F.dropout(x + self.position_embedding, self.config.dropout, self.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x, None, None)
        return self.head(self.final_norm(x)[:, 0])

    @torch.no_grad()
    def attention_rollout(self, images: torch.Tensor) -> torch.Tensor:
        """How much the class token draws on each patch, through all layers (Abnar & Zuidema 2020):
        per layer, average the heads' attention, add the residual (identity) and renormalise, then
        multiply the layers' matrices. Returns (B, H/patch, W/patch), each map summing to 1."""
        x = self.embed(images)
        rollout = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            weights = self_attention_weights(block, block.attention_norm(x)).mean(dim=1)
            weights = weights + torch.eye(x.shape[1])
            rollout = (weights / weights.sum(dim=-1, keepdim=True)) @ rollout
            x = block(x, None, None)
        side = self.config.image_size // self.config.patch_size
        cls_to_patches = rollout[:, 0, 1:]
        return (cls_to_patches / cls_to_patches.sum(dim=-1, keepdim=True)).reshape(-1, side, side)


def self_attention_weights(block: Block, normed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) of a bidirectional block's attention, (B, heads, T, T)."""
    attention = block.attention
    batch, length, _ = normed.shape
    q, k, _ = attention.qkv(normed).split(
        [attention.n_heads * attention.head_dim, attention.n_kv_heads * attention.head_dim,
         attention.n_kv_heads * attention.head_dim], dim=-1,
    )  # fmt: skip
    q = q.view(batch, length, attention.n_heads, attention.head_dim).transpose(1, 2)
    k = k.view(batch, length, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
    k = k.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=1)
    return (q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim)).softmax(dim=-1)


class MLPClassifier(Fittable, nn.Module):
    def __init__(self, inputs: int, classes: int, hidden: int = 128):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class SmallCNN(Fittable, nn.Module):
    def __init__(self, channels: int, classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(32 * (image_size // 2) ** 2, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8x8 digits as (train_x, train_y, test_x, test_y), x in [0, 1], shape (N, 1, 8, 8);
    a stratified split so every class is in both parts."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise missing_extra("the digits dataset", "scikit-learn", "vision") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target)
    train, test = train_test_split(
        range(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )  # fmt: skip
    return images[train], labels[train], images[test], labels[test]


def read_image(path: str | Path, image_size: int, grayscale: bool = False) -> torch.Tensor:
    """One image file through Pillow, resized to image_size square: (C, S, S) in [0, 1], C 1 or 3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if grayscale else "RGB").resize((image_size, image_size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise LmforgeError(f"{path}: not a readable image ({error})") from None
    channels = 1 if grayscale else 3
    return pixels.reshape(image_size, image_size, channels).permute(2, 0, 1).float() / 255


def load_image_folder(folder: str | Path, image_size: int, grayscale: bool = False):
    """Images under folder/CLASS/*.png (ImageFolder layout), resized to image_size square:
    (images (N, C, S, S) in [0, 1], labels (N,), class names)."""
    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise LmforgeError(f"{folder}: expected one sub-folder of images per class")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images.append(read_image(path, image_size, grayscale))
            labels.append(label)
    if not images:
        raise LmforgeError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return torch.stack(images), torch.tensor(labels), classes


class ProgressOverAllSteps(fit.Callback):
    """One progress bar over every step of the run (not one per epoch), showing the running loss."""

    def __init__(self, stream=None):
        self.stream = stream

    def on_train_begin(self, logs):
        self.bar, self.epoch = None, 0

    def on_epoch_begin(self, epoch, logs):
        self.epoch = epoch  # a resumed run starts at its own epoch and batch, and so does the count

    def on_batch_end(self, batch, logs):
        done = self.epoch * self.params["steps"] + batch + 1
        if self.bar is None:  # made at the first step, which a resumed run knows: its time per step is its own
            self.bar = ProgressBar(self.params["epochs"] * self.params["steps"], self.stream, initial=done - 1)
        self.bar.update(done, {"loss": logs["loss"]})

    def on_train_end(self, logs):
        if self.bar is not None:  # None: resumed after its last step
            self.bar.finish({"loss": logs["loss"]})


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    verbose: int = 1,
    stream=None,
) -> list[float]:
    """`fit` with AdamW and the warmup + cosine schedule over all steps; returns the mean training loss
    of each epoch. `verbose=1` draws one progress bar over all steps (on `stream`, default stdout)."""
    fit.compile(
        model, "adamw", "sparse_categorical_crossentropy", from_logits=True, learning_rate=lr, weight_decay=weight_decay
    )
    callbacks = [fit.WarmupCosine(min_ratio=0.0)] + ([ProgressOverAllSteps(stream)] if verbose else [])
    history = fit.fit(
        model, images, labels, epochs=epochs, batch_size=batch_size, callbacks=callbacks, verbose=0, seed=seed
    )
    return history.history["loss"]


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ids of `images`."""
    return fit.predict(model, images, batch_size).argmax(-1)


def save_rollout_png(image: torch.Tensor, rollout: torch.Tensor, path: str | Path) -> Path:
    """An image (C, H, W) beside its attention-rollout map, upsampled to the image's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = F.interpolate(rollout[None, None], size=image.shape[-2:], mode="nearest")[0, 0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(5, 2.6))
    shown = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
    left.imshow(shown.numpy(), cmap="gray")
    left.set_title("image")
    right.imshow(shown.numpy(), cmap="gray")
    right.imshow(heat.numpy(), cmap="inferno", alpha=0.6)
    right.set_title("attention rollout")
    for axes in (left, right):
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
