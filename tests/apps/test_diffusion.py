import json
import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from lmforge.apps import diffusion
from lmforge.apps.diffusion import (
    DiffusionConfig,
    TextToImageDiffusion,
    cosine_alpha_bars,
    ddim_sample,
    denoising_trajectory,
    load_captioned_images,
    load_diffusion,
    sample_images,
    save_diffusion,
    save_image_grid,
    save_trajectory,
    train_diffusion,
)
from lmforge.errors import LmforgeError
from lmforge.training import fit

TINY = DiffusionConfig(width=8, levels=2, timesteps=100, epochs=1, batch_size=16, ema_decay=0.9)


def tiny_digits(count: int = 32):
    images, captions, labels = diffusion.load_captioned_digits("train")
    return images[:count], captions[:count], labels[:count]


def test_cosine_schedule_matches_its_closed_form():
    timesteps = 1000
    alpha_bars = cosine_alpha_bars(timesteps)
    f = [math.cos((t / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(timesteps + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(timesteps)])
    # ᾱ_t = f(t)/f(0) exactly where no β was clipped at 0.999 (all but the last few steps)
    assert torch.allclose(alpha_bars[:990], expected[:990], atol=1e-5)
    assert (alpha_bars[1:] < alpha_bars[:-1]).all() and 0 < alpha_bars[-1] < 1e-3 and alpha_bars[0] > 0.999


@pytest.mark.parametrize("denoiser", ["unet", "dit"])
def test_denoisers_keep_the_image_shape(denoiser):
    config = replace(TINY, denoiser=denoiser, image_size=8, channels=3, n_layers=1, n_heads=2, width=16)
    model = TextToImageDiffusion(config)
    noisy = torch.randn(5, 3, 8, 8)
    output = model(noisy, torch.randint(0, 100, (5,)), torch.randn(5, 384))
    assert output.shape == noisy.shape
    # zero-initialised heads: an untrained model predicts no noise, so the loss starts at E[ε²] = 1
    assert output.abs().max() == 0


def test_dropped_text_gives_the_null_condition():
    torch.manual_seed(0)
    model = TextToImageDiffusion(TINY)
    torch.nn.init.normal_(model.denoiser.head[-1].weight)
    noisy, steps = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    text = torch.randn(2, 384)
    dropped = model(noisy, steps, text, torch.tensor([False, False]))
    other_text = model(noisy, steps, torch.randn(2, 384), torch.tensor([False, False]))
    kept = model(noisy, steps, text, torch.tensor([True, True]))
    assert torch.allclose(dropped, other_text) and not torch.allclose(dropped, kept)


class OracleDenoiser(torch.nn.Module):
    """The exact noise predictor for data that is one fixed image per condition: given the caption, the
    target image; without it, an all-black image. DDIM from such a predictor lands on the target."""

    def __init__(self, config: DiffusionConfig, targets: torch.Tensor):
        super().__init__()
        self.config, self.targets = config, targets  # targets (N, C, H, W) in [-1, 1]
        self.register_buffer("alpha_bars", cosine_alpha_bars(config.timesteps))

    def forward(self, noisy, timesteps, text, keep_text):
        target = torch.where(keep_text[:, None, None, None], self.targets.repeat(2, 1, 1, 1), -1.0)
        alpha_bar = self.alpha_bars[timesteps][:, None, None, None]
        return (noisy - alpha_bar.sqrt() * target) / (1 - alpha_bar).sqrt()


@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_with_an_exact_noise_predictor_reaches_the_target_and_guidance_mixes_as_defined(steps):
    targets = torch.rand(3, 1, 8, 8) * 2 - 1
    oracle = OracleDenoiser(TINY, targets)
    text = torch.randn(3, 384)
    conditional, _ = ddim_sample(oracle, text, steps, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(conditional, (targets + 1) / 2, atol=1e-4)
    unconditional, _ = ddim_sample(oracle, text, steps, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(unconditional, torch.zeros_like(unconditional), atol=1e-4)
    # guidance 0.5: ε halfway between the two predictors', so x0 is halfway between the targets
    halfway, _ = ddim_sample(oracle, text, steps, 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(halfway, (targets + 1) / 4 + 0.0, atol=1e-4)


def test_sampling_is_seeded_and_the_trajectory_ends_at_the_sample():
    torch.manual_seed(0)
    model = TextToImageDiffusion(TINY)
    torch.nn.init.normal_(model.denoiser.head[-1].weight, std=0.1)
    captions = ["a handwritten seven", "the digit 3", "a handwritten seven"]
    first = sample_images(model, captions, steps=5, seed=3)
    assert first.shape == (3, 1, 8, 8) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, sample_images(model, captions, steps=5, seed=3))
    assert not torch.equal(first, sample_images(model, captions, steps=5, seed=4))
    # noise is drawn for all images at once: batching the sampler changes nothing
    assert torch.equal(first, diffusion._sample(model, captions, 5, None, 3, 2, False)[0])
    trajectory = denoising_trajectory(model, captions, steps=5, seed=3)
    assert len(trajectory) == 6 and torch.equal(trajectory[-1], first)
    with pytest.raises(LmforgeError, match="steps must be in 1..100"):
        sample_images(model, captions, steps=101)


def test_training_lowers_the_noise_prediction_error():
    images, captions, _ = tiny_digits(32)
    config = replace(TINY, epochs=4, learning_rate=1e-2, ema_decay=0.0)  # 8 steps
    text = diffusion.embed_captions(captions, config.text_model)

    def error(model):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs = diffusion.DenoisingObjective(model)(images, text)
        return diffusion.noise_prediction_error(outputs, None, False).mean().item()

    untrained = error(TextToImageDiffusion(config))
    trained = error(train_diffusion(images, captions, config, verbose=0))
    assert untrained == pytest.approx(1.0, abs=0.15) and trained < 0.8 * untrained


def test_save_and_load_give_the_same_samples(tmp_path):
    torch.manual_seed(0)
    model = TextToImageDiffusion(replace(TINY, denoiser="dit", n_layers=1, n_heads=2, width=16))
    torch.nn.init.normal_(model.denoiser.head.weight, std=0.1)
    save_diffusion(model, tmp_path / "model")
    loaded = load_diffusion(tmp_path / "model")
    assert loaded.config == model.config
    assert torch.equal(sample_images(model, ["a two"], steps=3), sample_images(loaded, ["a two"], steps=3))


def test_loading_reports_what_is_wrong(tmp_path):
    with pytest.raises(LmforgeError, match="config.json: missing"):
        load_diffusion(tmp_path)
    save_diffusion(TextToImageDiffusion(TINY), tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**recorded, "kind": "gan"}))
    with pytest.raises(LmforgeError, match="a 'gan' model, not a diffusion model"):
        load_diffusion(tmp_path)
    recorded["config"]["width"] = 16
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(LmforgeError, match="model.safetensors: cannot load these weights"):
        load_diffusion(tmp_path)
    recorded["config"]["widht"] = 16
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(LmforgeError, match="widht"):
        load_diffusion(tmp_path)


class InterruptAt(fit.Callback):
    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def on_batch_end(self, batch, logs):
        self.seen += 1
        if self.seen == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path):
    images, captions, _ = tiny_digits(48)
    config = replace(TINY, epochs=2)  # 3 steps an epoch; the EMA's average is in the state too
    whole = train_diffusion(images, captions, config, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(images, captions, config, out=tmp_path, verbose=0, callbacks=[InterruptAt(4)])
    assert (tmp_path / "training_state.pt").is_file() and not (tmp_path / "model.safetensors").exists()
    # the same callbacks as the interrupted run (one that never fires): the state holds each one's
    resumed = train_diffusion(
        images, captions, config, out=tmp_path, resume=True, verbose=0, callbacks=[InterruptAt(0)]
    )
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert load_diffusion(tmp_path).config == config


def test_image_grid_png_has_one_tile_per_image(tmp_path):
    images = torch.zeros(5, 1, 8, 8)
    images[2] = 1.0  # the third tile white
    path = save_image_grid(images, tmp_path / "grid.png")
    with Image.open(path) as picture:
        assert picture.mode == "L"
        # 3 columns x 2 rows of 64-pixel tiles (8x8 scaled by 8) with 2-pixel gaps
        assert picture.size == (3 * 66 + 2, 2 * 66 + 2)
        assert picture.getpixel((2 + 2 * 66 + 30, 30)) == 255 and picture.getpixel((2 + 30, 30)) == 0
    with pytest.raises(LmforgeError, match="expected images"):
        save_image_grid(torch.zeros(2, 8, 8), tmp_path / "bad.png")


def test_trajectory_strip_has_a_row_per_image_and_a_column_per_frame(tmp_path):
    trajectory = [torch.full((2, 1, 8, 8), step / 10) for step in range(11)]
    written = save_trajectory(trajectory, tmp_path / "steps", frames=4)
    assert [path.name for path in written] == ["step_000.png", "step_003.png", "step_007.png", "step_010.png",
                                               "strip.png"]  # fmt: skip
    with Image.open(tmp_path / "steps" / "strip.png") as strip:
        assert strip.size == (4 * 66 + 2, 2 * 66 + 2)
        assert strip.getpixel((2 + 3 * 66 + 10, 2 + 66 + 10)) == 255  # the last frame of the second image


def test_captioned_images_from_a_folder(tmp_path):
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (20, 20), colour).save(tmp_path / name)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        '{"image": "red.png", "caption": "a red square"}\n\n{"image": "blue.png", "caption": "a blue square"}\n'
    )
    images, texts = load_captioned_images(tmp_path, captions, image_size=4)
    assert images.shape == (2, 3, 4, 4) and texts == ["a red square", "a blue square"]
    assert torch.allclose(images[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    for line, message in [
        ("not json", "captions.jsonl:1: not JSON"),
        ('{"image": "red.png"}', 'captions.jsonl:1: "caption" must be'),
        ('{"image": "green.png", "caption": "x"}', "captions.jsonl:1: no image"),
        ('{"image": "notes.txt", "caption": "x"}', "captions.jsonl:1: 'notes.txt' is not an image"),
        ('{"file": "red.png", "caption": "x"}', 'captions.jsonl:1: expected {"image"'),
    ]:
        captions.write_text(line + "\n")
        with pytest.raises(LmforgeError, match=message):
            load_captioned_images(tmp_path, captions, image_size=4)
    captions.write_text("\n")
    with pytest.raises(LmforgeError, match="no captioned images"):
        load_captioned_images(tmp_path, captions, image_size=4)


def test_training_checks_the_images_against_the_config():
    images, captions, _ = tiny_digits(8)
    with pytest.raises(LmforgeError, match=r"images have shape \(1, 8, 8\); the config wants \(3, 8, 8\)"):
        train_diffusion(images, captions, replace(TINY, channels=3), verbose=0)
    with pytest.raises(LmforgeError, match="8 images but 7 captions"):
        train_diffusion(images, captions[:7], TINY, verbose=0)


def test_train_image_then_imagine_from_the_command_line(tmp_path, capsys):
    from lmforge.cli import main

    run = tmp_path / "run"
    tiny = ["--width=8", "--timesteps=50", "--batch-size=512", "--captions-per-image", "1"]
    assert main(["train-image", "--out", str(run), "--epochs=1", *tiny]) == 0
    assert {"config.json", "model.safetensors", "training_state.pt"} <= {path.name for path in run.iterdir()}
    assert main(["train-image", "--out", str(run), "--epochs=1", *tiny]) == 2
    assert "holds a training run; --resume it" in capsys.readouterr().err
    assert main(["train-image", "--out", str(run), "--epochs=2", "--resume", *tiny]) == 0
    assert load_diffusion(run).config.epochs == 2
    grid, steps = tmp_path / "seven.png", tmp_path / "steps"
    arguments = ["imagine", "a handwritten seven", "--model", str(run), "--out", str(grid), "--n", "4", "--seed", "1"]
    assert main([*arguments, "--steps", "4", "--guidance", "2", "--trajectory", str(steps)]) == 0
    with Image.open(grid) as picture:
        assert picture.size == (2 * 66 + 2, 2 * 66 + 2)  # 4 tiles of 8x8 scaled by 8, 2 by 2
    assert sorted(path.name for path in steps.iterdir()) == [f"step_00{i}.png" for i in range(5)] + ["strip.png"]
    expected = sample_images(load_diffusion(run), ["a handwritten seven"] * 4, steps=4, guidance_scale=2, seed=1)
    with Image.open(steps / "step_004.png") as last, Image.open(grid) as picture:
        assert last.tobytes() == picture.tobytes()  # the trajectory ends at the grid's images
        assert picture.getpixel((2, 2)) == round(float(expected[0, 0, 0, 0]) * 255)


def test_train_image_on_your_own_captioned_images(tmp_path):
    from lmforge.cli import main

    folder = tmp_path / "pictures"
    folder.mkdir()
    lines = []
    for index, (name, colour) in enumerate([("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]):
        Image.new("RGB", (12, 12), colour).save(folder / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "caption": f"a {name} square"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    arguments = ["train-image", "--data", str(folder), "--captions", str(tmp_path / "captions.jsonl")]
    assert main([*arguments, "--out", str(run), "--channels=3", "--image-size=4", "--width=8", "--epochs=2"]) == 0
    assert sample_images(load_diffusion(run), ["a red square"], steps=2).shape == (1, 3, 4, 4)
