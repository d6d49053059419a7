"""The throughput benchmark compares like with like: its peer is nanoGPT's CPU recipe, and lmforge's
GPT-2 layout of that shape is the same network."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import train_throughput  # noqa: E402
from train_throughput import peer_model  # noqa: E402

from lmforge.model import Transformer  # noqa: E402

SHAPE = train_throughput.SHAPES["nanogpt-cpu"]


def test_peer_has_nanogpt_cpu_recipe_size_and_no_biases():
    model = peer_model(SHAPE)
    # nanoGPT's count for this recipe (bias=False): 4 * 12 * 128^2 + 9 LayerNorm weights + tied 65x128 head.
    non_embedding = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert non_embedding == 4 * 12 * 128**2 + 9 * 128 + 65 * 128
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]


def test_peer_optimizer_is_what_nanogpt_gets_on_cpu():
    optimizer = peer_model(SHAPE).configure_optimizer()
    for group in optimizer.param_groups:
        assert group["foreach"] is None and group["fused"] is None  # PyTorch's default: its per-parameter loop
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


def test_lmforge_gpt2_layout_is_the_peers_network():
    model = Transformer(train_throughput.lmforge_config(SHAPE, "gpt2"))
    reference = peer_model(SHAPE)
    assert model.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert model.flops_per_token() == reference.flops_per_token()
    shapes = sorted(tuple(p.shape) for p in model.parameters())
    assert shapes == sorted(tuple(p.shape) for p in reference.parameters())


def test_lmforge_llama_layout_does_at_least_the_peers_work():
    for shape in train_throughput.SHAPES.values():
        reference = peer_model(shape).flops_per_token()
        llama = Transformer(train_throughput.lmforge_config(shape, "llama")).flops_per_token()
        assert reference <= llama < 1.01 * reference


def test_round_robin_times_every_candidate_in_every_turn():
    calls = {"a": 0, "b": 0}

    def counting(name):
        def step(inputs, targets):
            assert inputs.shape == targets.shape == (SHAPE["batch_size"], SHAPE["block_size"])
            calls[name] += 1

        return step

    timings = train_throughput.time_round_robin({"a": counting("a"), "b": counting("b")}, SHAPE, seconds=0.0)
    assert len(timings["a"]) == len(timings["b"]) == train_throughput.MIN_TURNS
    assert calls["a"] == calls["b"] == 5 + 2 * train_throughput.MIN_TURNS  # warm-up, then two per turn
    assert all(t >= 0 for t in timings["a"] + timings["b"])


def test_inference_benchmark_competitors_keep_a_core_busy_and_stop():
    import time

    import inference

    (process,) = inference.busy_processes(1)
    try:
        time.sleep(1.5)
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu_seconds = (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s
    finally:
        process.kill()
        process.wait()
    assert cpu_seconds > 0.3  # busy, not sleeping (its start-up alone is ~0.1 s of CPU)
    assert process.returncode is not None


def test_inference_benchmark_under_load_ratios_compare_with_the_best_llama_cpp_row():
    import inference

    table = {
        "lmforge (threads chosen)": {"0": 90.0, "1": 60.0, "2": 40.0},
        "lmforge (fixed 2)": {"0": 90.0, "1": 30.0, "2": 10.0},
        "llama.cpp (2 threads)": {"0": 80.0, "1": 20.0, "2": 10.0},
        "llama.cpp (1 thread)": {"0": 60.0, "1": 50.0, "2": 40.0},
    }
    ratios = inference.print_under_load(table, threads=2)
    assert ratios == {
        "decode_0_busy_vs_best_llama_cpp": 90 / 80,
        "decode_1_busy_vs_best_llama_cpp": 60 / 50,
        "decode_2_busy_vs_best_llama_cpp": 1.0,
        "decode_1_busy_vs_own_idle": 60 / 90,
    }


GPU_BENCHMARKS = [["gpu_train.py"], ["inference.py", "--device", "cuda"], ["gpu_all.sh"]]


@pytest.mark.parametrize("command", GPU_BENCHMARKS, ids=["gpu_train", "inference --device cuda", "gpu_all.sh"])
def test_gpu_benchmarks_skip_cleanly_without_a_gpu(tmp_path, command):
    """CI has no GPU: each GPU benchmark says so, exits 0, and writes no results that could pass for a measurement."""
    import subprocess

    benchmarks = Path(__file__).parents[1] / "benchmarks"
    results = benchmarks / "results"
    before = {path: path.stat().st_mtime_ns for path in results.iterdir()}
    out = tmp_path / "gpu_train.json"
    extra = ["--out", str(out)] if command[0] == "gpu_train.py" else []
    environment = os.environ | {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    environment["PYTHON"] = sys.executable
    ran = subprocess.run(
        ["bash" if command[0].endswith(".sh") else sys.executable, str(benchmarks / command[0]), *command[1:], *extra],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "skipped: no CUDA device" in ran.stdout
    assert not out.exists()
    assert {path: path.stat().st_mtime_ns for path in results.iterdir()} == before


def test_gpu_train_shapes_are_gpt2_124m_and_a_1b_llama():
    import gpu_train
    from peers.nanogpt_style import NanoGPTStyle

    shape = gpu_train.SHAPES["gpt2-124m"]
    with torch.device("meta"):  # full size, no memory
        gpt2 = gpu_train.lmforge_model(shape, "gpt2")
        peer = NanoGPTStyle(
            shape["vocab_size"], shape["block_size"], shape["n_layers"], shape["n_heads"], shape["d_model"]
        )
        llama = gpu_train.lmforge_model(gpu_train.SHAPES["llama-1b"], "llama")
    assert gpt2.num_parameters() == sum(p.numel() for p in peer.parameters())  # the peer's network, 124M
    assert 124e6 < gpt2.num_parameters() < 125e6 and gpt2.flops_per_token() == peer.flops_per_token()
    assert 1.0e9 < llama.num_parameters() < 1.2e9
    assert llama.config.family == "llama" and llama.config.kv_heads == 4


def test_gpu_peaks_are_the_published_dense_bf16_ones():
    import gpu_train

    assert gpu_train.published_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_train.published_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_train.published_peak("NVIDIA L40") == 181e12 and gpu_train.published_peak("NVIDIA L4") == 121e12
    assert gpu_train.published_peak("Tesla T4") is None  # measured instead


def test_text_to_image_scores_real_digits_as_the_judge_reads_them():
    import text_to_image

    from lmforge.apps.vision import SmallCNN, load_digits_split, predict

    captions, asked = text_to_image.held_out_requests(6)
    assert len(captions) == 60 and asked.bincount().tolist() == [6] * 10
    assert captions[:3] == [
        "a drawing of the digit zero",
        "someone wrote the number 0",
        "the numeral zero in handwriting",
    ]
    _, _, test_x, test_y = load_digits_split()
    torch.manual_seed(0)
    judge = SmallCNN(1, 10, 8)  # untrained: the scores must still agree with its own reading
    features = text_to_image.judge_features(judge, test_x)
    assert features.shape == (len(test_x), 32 * 4 * 4)
    scores = text_to_image.judge_generated(judge, test_x, test_y, features, features, test_y)
    assert scores["asked_for_accuracy"] == (predict(judge, test_x) == test_y).float().mean().item()
    assert scores["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the same set as the reference
    assert scores["diversity"] == pytest.approx(1.0)
    # one image repeated for every request: no diversity at all
    collapsed = test_x[:1].expand(len(test_x), -1, -1, -1)
    scores = text_to_image.judge_generated(judge, collapsed, test_y, features, features, test_y)
    assert scores["diversity"] == pytest.approx(0.0, abs=1e-5)


def test_mean_pairwise_distance_counts_each_distinct_pair():
    import text_to_image

    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert text_to_image.mean_pairwise_distance(points) == pytest.approx((5 + 5 + 0) / 3)
