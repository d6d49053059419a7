"""The CUDA path's choices, checked without a GPU where the choice is a function (device, dtype,
backend, batch transfer, native CPU kernels refused off the CPU), and on a GPU where it needs one
(`needs_cuda`: skipped without; benchmarks/gpu_all.sh runs them on a GPU machine)."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.inference import engine
from lmforge.model import ModelConfig, Transformer, zeroed_from_os
from lmforge.settings import LLAMA_SWITCHES
from lmforge.training import distributed
from lmforge.training.optim import build_optimizer
from lmforge.training.pretrain import measure_matmul_flops, resolve_device, train
from lmforge.training.step import (
    apply_gradients,
    autocast_for,
    compute_dtype,
    forward_backward,
    next_token_forward,
    to_device,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = dict(vocab_size=64, block_size=32, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64)


@pytest.fixture
def cuda_present(monkeypatch):
    """A machine that reports a bf16-capable GPU (torch.device objects need no GPU to exist)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_cuda_under_torchrun_is_this_processs_own_gpu(cuda_present, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda:3")
    assert resolve_device("cuda") == torch.device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # named by the user: kept
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda:0")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LmforgeError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(LmforgeError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_a_gpu_the_machine_lacks_is_a_clear_error(cuda_present, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LmforgeError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_matmuls_run_in_bf16_on_a_gpu_and_fp32_on_a_cpu(cuda_present):
    assert compute_dtype(torch.device("cuda:0")) == torch.bfloat16
    assert compute_dtype(torch.device("cpu")) == torch.float32
    with autocast_for(torch.device("cpu")):  # no autocast at all on CPU
        assert not torch.is_autocast_enabled("cpu")


def test_processes_talk_over_nccl_on_gpus_and_gloo_on_cpus(cuda_present, monkeypatch):
    chosen = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: chosen.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(index))
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    assert distributed.init_process_group("cuda").local_rank == 1
    distributed.init_process_group("cpu")
    assert chosen == ["nccl", 1, "gloo"]


def test_a_cpu_batch_stays_where_it_is_on_cpu():
    batch = torch.arange(6).view(2, 3)
    assert to_device(batch, torch.device("cpu")) is batch  # no copy, no pinning


def test_the_peak_is_measured_in_the_dtype_asked_for():
    assert measure_matmul_flops(sizes=(64,), trials=1, seconds=0.01, dtype=torch.bfloat16) > 0


def test_native_cpu_paths_are_not_taken_off_the_cpu():
    """The native decode kernels and the mmap'd KV cache are CPU-only: a model or cache elsewhere (the
    meta device standing in for a GPU) takes PyTorch's path."""
    config = ModelConfig(**SMALL, **LLAMA_SWITCHES)
    assert engine.supports(Transformer(config)) == engine.kernels.available()  # the CPU model: as built
    with torch.device("meta"):
        assert not engine.supports(Transformer(config))
    cache = zeroed_from_os((2, 3), "meta", torch.float32)
    assert cache.device.type == "meta"


@needs_cuda
def test_a_training_step_on_cuda_uses_bf16_flash_attention_and_fused_adamw():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = resolve_device("cuda")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, **LLAMA_SWITCHES)).to(device)  # grouped-query: flash's enable_gqa
    optimizer = build_optimizer(model, 1e-3, 0.1)
    assert all(group["fused"] for group in optimizer.param_groups)
    inputs = to_device(torch.randint(0, 64, (4, 32)), device)
    assert inputs.device == device
    before = model.token_embedding.weight.detach().clone()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # an error if it cannot run: no silent fall back to MATH
        loss, logits = forward_backward(next_token_forward(model, inputs, inputs), 1, autocast_for(device))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    apply_gradients(optimizer, 1.0)
    assert not torch.equal(before, model.token_embedding.weight)


@needs_cuda
def test_the_measured_gpu_peak_is_in_teraflops():
    assert measure_matmul_flops("cuda", trials=1, seconds=0.05, dtype=torch.bfloat16) > 1e12


@needs_cuda
def test_pretraining_on_cuda_resumes_exactly(char_dataset, tmp_path):
    """`lmforge train --device cuda`: the whole loop on a GPU (pinned batches, bf16, fused AdamW), its
    checkpoint (CUDA RNG state included) resumed to the same losses as a straight run."""
    from .test_pretrain import losses, tiny_config

    settings = dict(device="cuda", max_steps=12, eval_interval=0, checkpoint_interval=6)
    train(tiny_config(char_dataset, tmp_path / "straight", **settings))
    train(tiny_config(char_dataset, tmp_path / "resumed", **(settings | dict(max_steps=6))))
    train(tiny_config(char_dataset, tmp_path / "resumed", **settings, resume=True))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 13))
    for step in straight:
        assert abs(straight[step] - resumed[step]) < 1e-4, (step, straight[step], resumed[step])


@pytest.mark.parametrize(
    "arguments",
    [
        ["explain", "--prompt", "hi"],
        ["explain", "--prompt", "hi", "--classifier", "never-read"],
        ["explain", "--prompt", "hi", "--image", "scene.png", "--model", "never-read"],
        ["train-image", "--epochs=1"],
        ["imagine", "a seven", "--model", "never-read"],
        ["recommend", "train", "--data", "synthetic"],
        ["recommend", "top", "never-read"],
        ["embed", "hello"],
        ["search", "never-read", "a query"],
        ["finetune", "--task", "vision-chat"],
    ],
    ids=lambda arguments: " ".join(arguments[:2]),
)
def test_every_verb_that_runs_a_model_refuses_a_gpu_the_machine_lacks_before_loading(
    arguments, monkeypatch, capsys, tmp_path
):
    from PIL import Image

    from lmforge.apps.vlm import CONFIG_FILE
    from lmforge.cli import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (48, 48)).save("scene.png")
    (tmp_path / "never-read").mkdir()
    (tmp_path / "never-read" / CONFIG_FILE).write_text("{}")  # a vision-language model folder, by its name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["--out", str(tmp_path / "out")] if arguments[0] in ("finetune", "train-image") else []
    assert main([*arguments, *out, "--device", "cuda"]) == 2
    assert "device='cuda' but CUDA is not available on this machine" in capsys.readouterr().err


def run_the_application_verbs(device: str, folder) -> dict:
    """train-image (diffusion and GAN) and imagine, recommend train and top, embed, search, explain (text,
    classifier) and finetune (classify, vision-chat), each with --device `device`, on tiny settings: what
    each printed or wrote that can be compared across devices."""
    import contextlib
    import io
    import json

    from lmforge.cli import main
    from lmforge.formats.checkpoint import save_model
    from lmforge.tokenizer import CharTokenizer

    def run(*arguments) -> str:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main([*arguments, "--device", device]) == 0, arguments
        return printed.getvalue()

    results = {}
    tiny = ["--width=8", "--timesteps=50", "--batch-size=512", "--epochs=1"]
    run("train-image", "--out", str(folder / "diffusion"), *tiny)
    run("imagine", "a seven", "--model", str(folder / "diffusion"), "--out", str(folder / "d.png"), "--steps", "4")
    run("train-image", "--model", "gan", "--out", str(folder / "gan"), "--width=8", "--noise-dim=8", "--steps=2")
    run("imagine", "a seven", "--model", str(folder / "gan"), "--out", str(folder / "g.png"))
    run("recommend", "train", "--data", "synthetic", "--out", str(folder / "recommend"), "--epochs=1", "--d-model=16")
    results["top"] = json.loads(run("recommend", "top", str(folder / "recommend"), "--user", "u1", "-k", "3"))
    results["embedding"] = json.loads(run("embed", "a red circle"))[0]["embedding"]
    (folder / "texts").mkdir()
    (folder / "texts" / "a.txt").write_text("Circles are round.\n\nSquares have four corners.")
    results["search"] = run("search", str(folder / "texts"), "how many corners", "-k", "1")
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz !")
    torch.manual_seed(0)
    decoder = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layers=1, n_heads=2,
                                      d_model=32))  # fmt: skip
    base = save_model(folder / "base", decoder, tokenizer)
    run("explain", "--model", str(base), "--prompt", "the cat", "--out", str(folder / "why"), "--top-k", "2")
    results["explain"] = json.loads((folder / "why" / "explain.json").read_text())["attributions"]["scores"]
    (folder / "reviews.csv").write_text("text,label\n" + "".join(f"so {w},{w}\n" for w in ["good", "bad"] * 12))
    run("finetune", "--task", "classify", "--data", str(folder / "reviews.csv"), "--model", str(base),
        "--out", str(folder / "classifier"), "--epochs=1", "--dropout=0")  # fmt: skip
    results["classify"] = json.loads((folder / "classifier" / "metrics.json").read_text())["history"]["loss"]
    run("explain", "--classifier", str(folder / "classifier"), "--prompt", "so good", "--out", str(folder / "why2"))
    from tests.apps.test_vlm import tiny_base

    vlm_base = tiny_base(folder / "vlm_base")
    run("finetune", "--task", "vision-chat", "--model", str(vlm_base), "--out", str(folder / "vlm"),
        "--train-chats=6", "--validation-chats=0", "--batch-size=3", "--encoder-images=6", "--encoder-epochs=1",
        "--lora-rank=2")  # fmt: skip
    results["vision_chat"] = json.loads((folder / "vlm" / "metrics.json").read_text())["history"]["loss"]
    return results


def test_the_application_verbs_run_end_to_end_with_a_device_on_the_cpu(tmp_path):
    """`run_the_application_verbs` on the CPU: the same code path as on CUDA (below), here to keep it true."""
    results = run_the_application_verbs("cpu", tmp_path)
    assert len(results["embedding"]) == 384 and len(results["top"]) == 3
    assert "four corners" in results["search"]


@needs_cuda
def test_the_application_verbs_run_on_cuda_as_on_the_cpu(tmp_path):
    on_cpu = run_the_application_verbs("cpu", tmp_path / "cpu")
    on_gpu = run_the_application_verbs("cuda", tmp_path / "gpu")
    assert on_gpu["embedding"] == pytest.approx(on_cpu["embedding"], abs=1e-4)
    assert on_gpu["search"] == on_cpu["search"]
    assert [row["item"] for row in on_gpu["top"]] == [row["item"] for row in on_cpu["top"]]
    for key in ("explain", "classify", "vision_chat"):  # dropout draws differ between devices
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=0.05, abs=1e-3), key
