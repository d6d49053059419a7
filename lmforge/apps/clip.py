"""Zero-shot image classification CLIP-style (Radford et al. 2021), from pieces lmforge already has.

An image tower (vision's ViT, or its small CNN) and a text tower (the frozen all-MiniLM-L6-v2 sentence
embedding + a learned linear projection) map images and captions into one space. Training pulls each
image towards its own caption and away from the batch's other captions: a symmetric cross-entropy
over the batch's image-caption similarity matrix, scaled by a learned temperature. Classifying needs
no classifier head: embed a caption per class ("a drawing of the digit seven") and pick the class
whose caption is nearest the image. The benchmark asks with phrasings that training never saw.

Training goes through `fit`: the model maps (images, caption embeddings) to the (B, B) similarity
logits and the loss reads the caption ids as targets, so progress, checkpoints and resume are fit's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.apps.diffusion import embed_captions
from lmforge.apps.vision import ProgressOverAllSteps, SmallCNN, VisionTransformer, ViTConfig
from lmforge.errors import LmforgeError
from lmforge.training import fit
from lmforge.training.fit import Fittable

IMAGE_ENCODERS = ("vit", "cnn")


@dataclass
class CLIPConfig:
    image_encoder: str = "vit"  # "vit": vision's ViT; "cnn": its SmallCNN
    image_size: int = 8
    channels: int = 1
    patch_size: int = 4
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 64
    embedding_dim: int = 64  # the shared image-text space
    text_dim: int = 384  # the sentence embedding's width (all-MiniLM-L6-v2)
    text_model: str = "all-minilm-l6-v2"
    initial_temperature: float = 0.07  # CLIP's; learned, its inverse capped at 100 as CLIP does

    def __post_init__(self):
        if self.image_encoder not in IMAGE_ENCODERS:
            raise LmforgeError(f"CLIP image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")


class CLIPModel(Fittable, nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        if config.image_encoder == "vit":
            # the ViT's classification head becomes the projection into the shared space
            self.image_encoder = VisionTransformer(ViTConfig(
                image_size=config.image_size, patch_size=config.patch_size, channels=config.channels,
                classes=config.embedding_dim, n_layers=config.n_layers, n_heads=config.n_heads,
                d_model=config.d_model,
            ))  # fmt: skip
        else:
            self.image_encoder = SmallCNN(config.channels, config.embedding_dim, config.image_size)
        self.text_projection = nn.Linear(config.text_dim, config.embedding_dim, bias=False)
        self.log_inverse_temperature = nn.Parameter(torch.tensor(math.log(1 / config.initial_temperature)))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → unit vectors (B, embedding_dim)."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def text_embeddings(self, sentence_embeddings: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (B, text_dim) → unit vectors (B, embedding_dim)."""
        return F.normalize(self.text_projection(sentence_embeddings), dim=-1)

    def forward(self, images: torch.Tensor, sentence_embeddings: torch.Tensor) -> torch.Tensor:
        """The batch's (B, B) similarity logits: row i is image i against every caption."""
        scale = self.log_inverse_temperature.clamp(max=math.log(100)).exp()
        return scale * self.image_embeddings(images) @ self.text_embeddings(sentence_embeddings).T


def contrastive_loss(logits: torch.Tensor, caption_ids: torch.Tensor, from_logits: bool = True) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, per example: image → caption over the rows, caption → image over
    the columns. Every pair in the batch with the same caption is a match (the targets spread evenly over
    them): with a few distinct captions, duplicates in a batch are common and are not negatives."""
    matches = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = matches / matches.sum(dim=1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1)
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1)
    return (image_to_text + text_to_image) / 2


def train_clip(
    images: torch.Tensor,
    captions: list[str],
    config: CLIPConfig | None = None,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    verbose: int = 1,
    stream=None,
    checkpoint=None,
    resume: bool = False,
) -> CLIPModel:
    """Contrastive training on (image, caption) pairs: `images` (N, C, H, W) in [0, 1], one caption each.
    `checkpoint` and `resume` are `fit`'s (a training-state file)."""
    config = config or CLIPConfig()
    if len(captions) != len(images):
        raise LmforgeError(f"{len(images)} images but {len(captions)} captions")
    torch.manual_seed(seed)
    model = CLIPModel(config)
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    caption_ids = torch.tensor([row[caption] for caption in captions])
    sentence_embeddings = embed_captions(captions, config.text_model)
    fit.compile(model, "adamw", contrastive_loss, learning_rate=lr, weight_decay=weight_decay)
    callbacks = [fit.WarmupCosine(min_ratio=0.0)] + ([ProgressOverAllSteps(stream)] if verbose else [])
    fit.fit(
        model, (images.float(), sentence_embeddings), caption_ids, epochs=epochs, batch_size=batch_size,
        callbacks=callbacks, verbose=0, seed=seed, checkpoint=checkpoint, resume=resume,
    )  # fmt: skip
    return model.eval()


@torch.no_grad()
def zero_shot_logits(model: CLIPModel, images: torch.Tensor, class_captions: list[list[str]]) -> torch.Tensor:
    """(N, classes) similarities of each image to each class, a class described by one or more captions
    whose projected embeddings are averaged (CLIP's prompt ensembling)."""
    model.eval()
    prompts = [caption for captions in class_captions for caption in captions]
    text = model.text_embeddings(embed_captions(prompts, model.config.text_model))
    counts = [len(captions) for captions in class_captions]
    per_class = F.normalize(torch.stack([part.mean(0) for part in text.split(counts)]), dim=-1)
    image = torch.cat([model.image_embeddings(batch) for batch in images.float().split(256)])
    return image @ per_class.T


def zero_shot_classify(model: CLIPModel, images: torch.Tensor, class_captions: list[list[str]]) -> torch.Tensor:
    """The class id of each image: the class whose caption(s) it is nearest."""
    return zero_shot_logits(model, images, class_captions).argmax(dim=-1)
