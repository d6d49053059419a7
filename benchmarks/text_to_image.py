"""Text-to-image on the digits: diffusion vs the GAN baseline, and CLIP-style zero-shot classification.

Both generators train on the same captioned training split (scikit-learn's 8x8 digits, training
phrasings) and are asked for 1,000 images, 100 per digit, in the held-out phrasings ("someone wrote
the number 7"), which training never saw. A judge classifier (vision's ViT) trained on the real
training digits then measures, for each model:

- asked-for accuracy: the share of images the judge reads as the digit asked for;
- Fréchet distance between the judge's features (its class token before the head) of the generated
  images and of the real training images, FID's recipe with our classifier in Inception's place;
- diversity: the mean pairwise distance between the judge's features of images asked for the same
  digit, as a fraction of the same for the real test images of that digit (1.0: as varied as real
  handwriting; a mode-collapsed model scores near 0);
- training and sampling time.

CLIP: contrastive training on the same pairs with a ViT (and, as its peer, a CNN) image tower;
zero-shot accuracy on the held-out test digits by the nearest caption in each held-out phrasing, and
with the three phrasings' embeddings averaged. The supervised judge's test accuracy is the ceiling.

    python benchmarks/text_to_image.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from lmforge.apps.captions import HELD_OUT_PHRASINGS, digit_caption
from lmforge.apps.clip import CLIPConfig, train_clip, zero_shot_classify
from lmforge.apps.diffusion import (
    DiffusionConfig,
    load_captioned_digits,
    sample_images,
    save_image_grid,
    train_diffusion,
)
from lmforge.apps.gan import GANConfig, sample_gan_images, train_gan
from lmforge.apps.vision import VisionTransformer, ViTConfig, load_digits_split, predict, train_classifier
from lmforge.evaluation.metrics import frechet_distance

RESULTS = Path(__file__).parent / "results"
IMAGES_PER_DIGIT = 100


def held_out_requests(images_per_digit: int = IMAGES_PER_DIGIT) -> tuple[list[str], torch.Tensor]:
    """Captions asking for each digit `images_per_digit` times, cycling through the held-out phrasings."""
    labels = torch.arange(10).repeat_interleave(images_per_digit)
    captions = [
        digit_caption(int(label), HELD_OUT_PHRASINGS[i % len(HELD_OUT_PHRASINGS)]) for i, label in enumerate(labels)
    ]
    return captions, labels


@torch.no_grad()
def judge_features(judge: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the judge's classification head reads: (N, features)."""
    captured = []
    hook = judge.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        judge.eval()
        for batch in images.split(256):
            judge(batch)
    finally:
        hook.remove()
    return torch.cat(captured)


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over distinct pairs of rows."""
    distances = torch.cdist(features.double(), features.double())
    count = len(features)
    return (distances.sum() / (count * (count - 1))).item()


def diversity(
    features: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor, real_labels: torch.Tensor
) -> float:
    """Per digit, the mean pairwise feature distance of the images, over that of real images of the digit;
    averaged over the digits."""
    ratios = [
        mean_pairwise_distance(features[labels == digit]) / mean_pairwise_distance(real_features[real_labels == digit])
        for digit in labels.unique().tolist()
    ]
    return sum(ratios) / len(ratios)


def judge_generated(judge, images, asked, train_features, test_features, test_labels) -> dict:
    """Asked-for accuracy (overall and per held-out phrasing), Fréchet distance to the real training
    images and diversity of `images` generated when asked for the digits `asked` (held-out phrasings in turn)."""
    predicted = predict(judge, images)
    features = judge_features(judge, images)
    per_phrasing = {}
    for index, phrasing in enumerate(HELD_OUT_PHRASINGS):
        chosen = torch.arange(len(asked)) % len(HELD_OUT_PHRASINGS) == index
        per_phrasing[phrasing] = (predicted[chosen] == asked[chosen]).float().mean().item()
    return {
        "asked_for_accuracy": (predicted == asked).float().mean().item(),
        "accuracy_per_held_out_phrasing": per_phrasing,
        "frechet_distance": frechet_distance(features, train_features),
        "diversity": diversity(features, asked, test_features, test_labels),
    }


def timed(function, *arguments, **keywords):
    start = time.perf_counter()
    result = function(*arguments, **keywords)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument(
        "--captions-per-image", type=int, default=2, help="training copies of each image (as train-image)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, numbers meaningless")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and sample grids")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_x, train_y, test_x, test_y = load_digits_split()
    images, captions, _ = load_captioned_digits("train", captions_per_image=args.captions_per_image)
    requests, asked = held_out_requests(2 if args.quick else IMAGES_PER_DIGIT)
    diffusion_config, gan_config = DiffusionConfig(), GANConfig()
    judge_epochs, clip_epochs = 60, 4
    if args.quick:
        diffusion_config, gan_config = replace(diffusion_config, epochs=1), replace(gan_config, steps=20)
        judge_epochs, clip_epochs = 2, 1
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    judge = VisionTransformer(ViTConfig(patch_size=4))
    _, judge_seconds = timed(train_classifier, judge, train_x, train_y, epochs=judge_epochs, lr=2e-3, verbose=0)
    judge_accuracy = (predict(judge, test_x) == test_y).float().mean().item()
    train_features, test_features = judge_features(judge, train_x), judge_features(judge, test_x)
    print(f"judge: ViT (patch 4), test accuracy {judge_accuracy:.4f}, trained in {judge_seconds:.0f}s", flush=True)
    real = {
        "asked_for_accuracy": judge_accuracy,
        "frechet_distance": frechet_distance(test_features, train_features),
        "diversity": 1.0,
    }

    generators = {}
    print(f"training diffusion ({diffusion_config.denoiser}) on {len(images)} captioned images ...", flush=True)
    model, seconds = timed(train_diffusion, images, captions, diffusion_config, verbose=0)
    generated, sample_seconds = timed(sample_images, model, requests, steps=50, seed=1)
    generators[f"diffusion ({diffusion_config.denoiser}, DDIM 50 steps)"] = (generated, seconds, sample_seconds,
                                                                            asdict(diffusion_config))  # fmt: skip
    print(f"training the GAN on {len(images)} captioned images ...", flush=True)
    model, seconds = timed(train_gan, images, captions, gan_config, verbose=0)
    generated, sample_seconds = timed(sample_gan_images, model, requests, seed=1)
    generators["GAN (DCGAN, projection D)"] = (generated, seconds, sample_seconds, asdict(gan_config))

    rows = []
    for name, (generated, seconds, sample_seconds, config) in generators.items():
        scores = judge_generated(judge, generated, asked, train_features, test_features, test_y)
        rows.append({"model": name, **scores, "train_seconds": seconds, "sample_seconds": sample_seconds,
                     "config": config})  # fmt: skip
        first_of_each = torch.cat([generated[asked == digit][:8] for digit in range(10)])
        stem = "text_to_image_" + name.split()[0].lower()
        save_image_grid(first_of_each, args.out / f"{stem}_samples.png", columns=8)

    clip_rows = []
    clip_images, clip_captions = load_captioned_digits("train", captions_per_image=8)[:2]
    for tower in ("vit", "cnn"):
        model, seconds = timed(train_clip, clip_images, clip_captions, CLIPConfig(image_encoder=tower),
                               epochs=clip_epochs, verbose=0)  # fmt: skip
        per_phrasing = {
            phrasing: (zero_shot_classify(model, test_x, [[digit_caption(d, phrasing)] for d in range(10)]) == test_y)
            .float().mean().item()
            for phrasing in HELD_OUT_PHRASINGS
        }  # fmt: skip
        ensemble = [[digit_caption(d, phrasing) for phrasing in HELD_OUT_PHRASINGS] for d in range(10)]
        ensemble_accuracy = (zero_shot_classify(model, test_x, ensemble) == test_y).float().mean().item()
        clip_rows.append({
            "image_tower": tower, "zero_shot_accuracy_per_held_out_phrasing": per_phrasing,
            "zero_shot_accuracy_mean_over_phrasings": sum(per_phrasing.values()) / len(per_phrasing),
            "zero_shot_accuracy_phrasing_ensemble": ensemble_accuracy, "train_seconds": seconds,
        })  # fmt: skip

    print(f"\n{len(requests)} images asked for by held-out phrasings; judge: ViT trained on real digits")
    print(f"{'model':<36}{'asked-for acc':>14}{'Fréchet':>9}{'diversity':>10}{'train':>8}{'sample':>8}")
    print(f"{'real test digits (reference)':<36}{real['asked_for_accuracy']:>14.3f}{real['frechet_distance']:>9.2f}"
          f"{real['diversity']:>10.2f}{'':>8}{'':>8}")  # fmt: skip
    for row in rows:
        print(f"{row['model']:<36}{row['asked_for_accuracy']:>14.3f}{row['frechet_distance']:>9.2f}"
              f"{row['diversity']:>10.2f}{row['train_seconds']:>7.0f}s{row['sample_seconds']:>7.0f}s")  # fmt: skip
    print(f"\nCLIP-style zero-shot on {len(test_y)} held-out test digits (supervised judge: {judge_accuracy:.3f})")
    print(f"{'image tower':<14}{'mean over phrasings':>20}{'ensemble':>10}{'train':>8}")
    for row in clip_rows:
        print(f"{row['image_tower']:<14}{row['zero_shot_accuracy_mean_over_phrasings']:>20.3f}"
              f"{row['zero_shot_accuracy_phrasing_ensemble']:>10.3f}{row['train_seconds']:>7.0f}s")  # fmt: skip

    result = {
        "threads": args.threads,
        "quick": args.quick,
        "training_images": len(images),
        "generated_images": len(requests),
        "held_out_phrasings": list(HELD_OUT_PHRASINGS),
        "judge": {
            "model": "vit (patch 4, 4 layers, d 64)",
            "test_accuracy": judge_accuracy,
            "train_seconds": judge_seconds,
            "features": "class token after the final norm (64)",
        },  # fmt: skip
        "real_test_digits": real,
        "generators": rows,
        "clip": clip_rows,
    }
    path = args.out / ("text_to_image_quick.json" if args.quick else "text_to_image.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
