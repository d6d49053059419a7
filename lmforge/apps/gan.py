"""A text-conditioned GAN: the baseline the diffusion model is measured against.

DCGAN (Radford et al. 2016): the generator grows a noise vector into an image with upsampling
convolutions, batch norm and ReLU; the discriminator shrinks the image with strided convolutions and
LeakyReLU. Conditioning follows the projection discriminator (Miyato & Koyama 2018): the generator
reads the caption's sentence embedding (all-MiniLM-L6-v2, as the diffusion model does) beside the
noise, and the discriminator's score is an unconditional term plus the inner product of its image
features with a projection of that embedding. Spectral norm on the discriminator and the hinge loss
(SNGAN, Miyato et al. 2018) keep the two-player game stable on small batches; samples come from an
exponential moving average of the generator's weights (Karras et al. 2018), which are steadier than
the last step's.

The training and sampling calls have the diffusion model's shape: `train_gan(images, captions,
config)`, `sample_gan_images(model, captions, seed)` in [0, 1], `save_gan` / `load_gan`.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from lmforge.apps.diffusion import (
    TRAINING_STATE_FILE,
    check_captioned_images,
    embed_captions,
    load_image_model_weights,
    read_image_model_config,
    save_image_model,
)
from lmforge.errors import LmforgeError
from lmforge.settings import GANConfig
from lmforge.training.optim import build_optimizer
from lmforge.training.progress import ProgressBar

__all__ = ["GANConfig", "ConditionalGAN", "train_gan", "sample_gan_images", "save_gan", "load_gan"]

KIND = "gan"


class Generator(nn.Module):
    """(noise (B, noise_dim), caption embedding (B, text_dimensions)) → images (B, C, S, S) in [-1, 1]."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        top = config.width * 2**config.upsampling_stages
        self.condition_projection = nn.Sequential(
            nn.Linear(config.text_dimensions, config.text_projection_dim), nn.LeakyReLU(0.2)
        )
        self.stem = nn.Sequential(
            nn.Linear(config.noise_dim + config.text_projection_dim, top * 16, bias=False),
            nn.Unflatten(1, (top, 4, 4)), nn.BatchNorm2d(top), nn.ReLU(),
        )  # fmt: skip
        stages = []
        for stage in range(config.upsampling_stages):
            in_channels = top // 2**stage
            # a 4x4 kernel at stride 2 covers each output pixel evenly (no checkerboard from 3x3/2)
            stages += [
                nn.ConvTranspose2d(in_channels, in_channels // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(in_channels // 2), nn.ReLU(),
            ]  # fmt: skip
        self.upsample = nn.Sequential(*stages)
        self.to_image = nn.Conv2d(config.width, config.channels, 3, padding=1)

    def forward(self, noise: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.cat([noise, self.condition_projection(condition)], dim=1))
        return torch.tanh(self.to_image(self.upsample(x)))


class Discriminator(nn.Module):
    """(images (B, C, S, S) in [-1, 1], caption embedding) → a realness score per image (B,)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        layers = [spectral_norm(nn.Conv2d(config.channels, config.width, 3, padding=1)), nn.LeakyReLU(0.2)]
        channels = config.width
        for _ in range(config.upsampling_stages):
            layers += [spectral_norm(nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            channels *= 2
        self.features = nn.Sequential(*layers, nn.Flatten(), spectral_norm(nn.Linear(channels * 16, channels)))
        self.score = spectral_norm(nn.Linear(channels, 1))
        self.condition_projection = spectral_norm(nn.Linear(config.text_dimensions, channels))

    def forward(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        features = F.leaky_relu(self.features(images), 0.2)
        projection = (self.condition_projection(condition) * features).sum(dim=1)
        return self.score(features).squeeze(1) + projection


class ConditionalGAN(nn.Module):
    """The generator, its weight average (what samples come from) and the discriminator."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.average_generator = copy.deepcopy(self.generator).requires_grad_(False)

    @torch.no_grad()
    def update_average(self, step: int) -> None:
        # the decay warms up ((1 + step) / (10 + step), as TensorFlow's ExponentialMovingAverage with
        # num_updates): a short run's average would otherwise still be mostly the initial weights
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))
        for average, current in zip(self.average_generator.parameters(), self.generator.parameters()):
            average.lerp_(current, 1 - decay)
        for average, current in zip(self.average_generator.buffers(), self.generator.buffers()):
            average.copy_(current)  # batch-norm statistics and counters


@dataclass
class GANTrainingState:
    """Where a run is, for `resume`: the step and the optimizers' and RNG's states (weights live in the model)."""

    step: int
    generator_optimizer: dict
    discriminator_optimizer: dict
    rng: torch.Tensor


def save_training_state(path: Path, model: ConditionalGAN, state: GANTrainingState) -> None:
    """The model's weights and the run's state in one file, written atomically; loads with weights_only=True."""
    from lmforge.atomic import write_atomically

    payload = {"weights": model.state_dict(), "config": asdict(model.config), **vars(state)}
    write_atomically(path, lambda temporary: torch.save(payload, temporary))


def load_training_state(path: Path, model: ConditionalGAN) -> GANTrainingState:
    from lmforge.formats.checkpoint import load_torch_file

    payload = load_torch_file(path, "resuming needs the training state the run wrote")
    try:
        # a resumed run may go on for more steps; anything else changes what the weights mean
        changed = sorted(k for k, v in asdict(model.config).items() if k != "steps" and payload["config"].get(k) != v)
        if changed:
            raise ValueError(f"it was written with another config (differs in {changed})")
        model.load_state_dict(payload["weights"])
        return GANTrainingState(
            payload["step"], payload["generator_optimizer"], payload["discriminator_optimizer"], payload["rng"]
        )
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise LmforgeError(f"{path}: cannot resume GAN training from it ({error})") from None


def train_gan(
    images: torch.Tensor,
    captions: list[str],
    config: GANConfig | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    verbose: int = 1,
    stream=None,
    condition: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> ConditionalGAN:
    """Train a text-conditioned GAN on `images` (N, C, S, S) in [0, 1] with one caption each, on `device`
    (the data stays where it is; each batch moves there, drawn by the same CPU generator on any device).

    With `out` (a folder), the weights and the run's state go to out/training_state.pt every
    `checkpoint_interval` steps and at the end, and the finished model (config.json + model.safetensors)
    to `out`; `resume=True` continues a run from its training state exactly as it would have gone on
    (it may also go on to more `steps`). `condition` (N, d) stands in for the captions' embeddings."""
    config = config or GANConfig()
    check_captioned_images(images, captions, config)
    checkpoint = None if out is None else Path(out) / TRAINING_STATE_FILE
    if resume and (checkpoint is None or not checkpoint.is_file()):
        raise LmforgeError(f"resume needs the training state a run wrote; there is none at {checkpoint}")
    torch.manual_seed(config.seed)
    model = ConditionalGAN(config).to(device)
    if condition is None:
        condition = embed_captions(captions, config.text_model)
    real = images.float() * 2 - 1
    generator_optimizer = build_optimizer(
        model.generator, config.generator_lr, 0.0, "adam", betas=(config.beta1, config.beta2)
    )
    discriminator_optimizer = build_optimizer(
        model.discriminator, config.discriminator_lr, 0.0, "adam", betas=(config.beta1, config.beta2)
    )
    rng = torch.Generator().manual_seed(config.seed)
    start = 0
    if resume:
        state = load_training_state(checkpoint, model)
        generator_optimizer.load_state_dict(state.generator_optimizer)
        discriminator_optimizer.load_state_dict(state.discriminator_optimizer)
        rng.set_state(state.rng)
        start = state.step

    def save(step: int, rng_state: torch.Tensor) -> None:
        if checkpoint is not None:
            state = GANTrainingState(
                step, generator_optimizer.state_dict(), discriminator_optimizer.state_dict(), rng_state
            )
            save_training_state(checkpoint, model, state)

    bar = ProgressBar(config.steps, stream or sys.stderr, initial=start) if verbose else None
    model.train()
    logs: dict = {}
    # Ctrl-C saves the last completed step, unless it lands between the two players' updates, where the
    # weights belong to no step (then the last periodic state stands).
    completed, completed_rng, updating = start, rng.get_state(), False
    try:
        for step in range(start, config.steps):
            index = torch.randint(len(real), (config.batch_size,), generator=rng)
            real_batch, condition_batch = real[index].to(device), condition[index].to(device)
            noise = torch.randn(config.batch_size, config.noise_dim, generator=rng).to(device)
            fake = model.generator(noise, condition_batch)
            # hinge loss: the discriminator pushes real scores above 1 and fake ones below -1. A real image
            # under another image's caption counts as fake too (GAN-CLS, Reed et al. 2016), so the
            # discriminator judges whether image and caption match from the first steps; a caption that
            # happens to describe the same digit is noise the average absorbs.
            mismatched = condition_batch.roll(1, dims=0)
            discriminator_loss = (
                F.relu(1 - model.discriminator(real_batch, condition_batch)).mean()
                + F.relu(1 + model.discriminator(fake.detach(), condition_batch)).mean() * (1 - config.mismatch_weight)
                + F.relu(1 + model.discriminator(real_batch, mismatched)).mean() * config.mismatch_weight
            )
            if not torch.isfinite(discriminator_loss):  # before the update: the weights stay the last step's
                raise LmforgeError(f"GAN step {step + 1}: the loss is not finite; lower the learning rates")
            updating = True
            discriminator_optimizer.zero_grad(set_to_none=True)
            discriminator_loss.backward()
            discriminator_optimizer.step()
            generator_loss = -model.discriminator(fake, condition_batch).mean()
            generator_optimizer.zero_grad(set_to_none=True)
            generator_loss.backward()
            generator_optimizer.step()
            model.update_average(step)
            updating = False
            completed, completed_rng = step + 1, rng.get_state()
            logs = {"d_loss": discriminator_loss.item(), "g_loss": generator_loss.item()}
            if bar is not None:
                bar.update(step + 1, logs)
            if checkpoint is not None and config.checkpoint_interval and (step + 1) % config.checkpoint_interval == 0:
                save(step + 1, completed_rng)
    except KeyboardInterrupt:
        if checkpoint is not None and not updating and completed > start:
            save(completed, completed_rng)
            print(f"\ninterrupted: saved step {completed} to {checkpoint}; continue with --resume", file=sys.stderr)
        raise
    if bar is not None:
        bar.finish(logs)
    save(config.steps, rng.get_state())
    model.eval()
    if out is not None:
        save_gan(model, out)
    return model


@torch.no_grad()
def sample_gan_images(
    model: ConditionalGAN,
    captions: list[str],
    seed: int = 0,
    batch_size: int = 256,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """One image per caption from the averaged generator, (N, C, S, S) in [0, 1]; the same seed gives the
    same images. `condition` (N, d) gives the caption embeddings instead of embedding `captions`."""
    if condition is None:
        condition = embed_captions(list(captions), model.config.text_model)
    generator = model.average_generator.eval()
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(condition), model.config.noise_dim, generator=rng)  # on the CPU: the same on any device
    images = [
        generator(noise[start : start + batch_size].to(device), condition[start : start + batch_size].to(device)).cpu()
        for start in range(0, len(condition), batch_size)
    ]
    return (
        (torch.cat(images) + 1) / 2 if images else torch.empty(0, model.config.channels, *[model.config.image_size] * 2)
    )


def save_gan(model: ConditionalGAN, path: str | Path) -> Path:
    """config.json (`"kind": "gan"`) + model.safetensors, the averaged generator's weights (all sampling
    needs), into folder `path`, atomically with the config last; other files there (a training state) stay."""
    return save_image_model(path, KIND, model.config, model.average_generator)


def load_gan(path: str | Path, device: str | torch.device = "cpu") -> ConditionalGAN:
    """A model `save_gan` (or `lmforge train-image --model gan`) wrote, on `device`, ready for
    `sample_gan_images`; the discriminator is not saved, so it cannot train on."""
    model = ConditionalGAN(read_image_model_config(path, KIND, GANConfig()))
    load_image_model_weights(model.average_generator, path)
    model.generator.load_state_dict(model.average_generator.state_dict())
    return model.to(device).eval()
