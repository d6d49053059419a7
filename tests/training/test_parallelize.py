"""Sharded training (FSDP2 / HSDP through `parallelize`) against one process with the same global batch,
and sharded checkpoints resumed on a different number of processes. CPU, gloo, under torchrun."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.training import distributed
from lmforge.training.parallelize import device_mesh, mixed_precision_for, parallelize
from lmforge.training.pretrain import read_metrics, train_config_from

STEPS = 8
GLOBAL_BATCH = 8


def command_line(data_dir, out_dir, *options):
    return [
        "train",
        "--preset=tiny",
        f"--data_dir={data_dir}",
        f"--out_dir={out_dir}",
        f"--max_steps={STEPS}",
        "--eval_interval=4",  # evaluation runs on the sharded model too
        "--eval_tokens=256",
        "--grad_clip=0.3",  # below the gradients' norm: clipping must see the whole model's norm, not a shard's
        "--log_interval=1",
        "--checkpoint_interval=4",
        "--keep_checkpoints=0",  # keep step 4 for the resume tests
        "--progress=plain",
        "--plot=false",
        "--peak_flops=1e11",
        "--warmup_steps=2",
        *options,
    ]


def run(processes: int, arguments: list[str], expect_success: bool = True) -> subprocess.CompletedProcess:
    """`lmforge train` alone or under torchrun (a free port: --standalone)."""
    launcher = [sys.executable, "-m", "lmforge"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m", "lmforge"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *arguments], capture_output=True, text=True, env=env, timeout=300)
    if expect_success:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out_dir) -> dict[int, float]:
    # Keyed by step: a resumed run's records replace those of the steps it replays.
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r}


def assert_same_losses(reference: dict, other: dict, steps=range(1, STEPS + 1)) -> None:
    assert sorted(other) == sorted(reference) == list(range(1, STEPS + 1))
    for step in steps:
        assert abs(reference[step] - other[step]) < 1e-5, (step, reference[step], other[step])


def rewind_to_step_4(out_dir) -> None:
    """As if the run had stopped after its step-4 checkpoint."""
    checkpoints = out_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_000008")
    (checkpoints / "latest").write_text("step_000004")


@pytest.fixture(scope="module")
def one_process(char_dataset, tmp_path_factory):
    """The reference: one process, the whole global batch, a plain model; parallel=fsdp so it writes the
    sharded checkpoints that two processes resume."""
    out_dir = tmp_path_factory.mktemp("one_process")
    run(1, command_line(char_dataset, out_dir, f"--batch_size={GLOBAL_BATCH}", "--parallel=fsdp"))
    return out_dir


@pytest.fixture(scope="module")
def two_processes_fsdp(char_dataset, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    stdout = run(
        2, command_line(char_dataset, out_dir, f"--batch_size={GLOBAL_BATCH // 2}", "--parallel", "fsdp")
    ).stdout
    return out_dir, stdout


def test_fsdp_on_two_processes_matches_one_process(one_process, two_processes_fsdp):
    out_dir, stdout = two_processes_fsdp
    assert "fsdp over 2 processes" in stdout
    assert_same_losses(losses(one_process), losses(out_dir))
    shards = sorted(p.name for p in (out_dir / "checkpoints" / "step_000008" / "shards").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shard


def test_fsdp_with_activation_checkpointing_and_accumulation_matches_one_process(one_process, char_dataset, tmp_path):
    # Two micro-steps per step: the first skips FSDP's reduce-scatter (no_gradient_sync).
    arguments = [f"--batch_size={GLOBAL_BATCH // 4}", "--grad_accum_steps=2", "--parallel=fsdp",
                 "--activation-checkpointing"]  # fmt: skip
    run(2, command_line(char_dataset, tmp_path, *arguments))
    assert_same_losses(losses(one_process), losses(tmp_path))


def test_hsdp_on_four_processes_as_two_by_two_matches_one_process(one_process, char_dataset, tmp_path):
    arguments = [f"--batch_size={GLOBAL_BATCH // 4}", "--parallel=hsdp", "--hsdp_shard_processes=2"]
    stdout = run(4, command_line(char_dataset, tmp_path, *arguments)).stdout
    assert "hsdp: 2 replicas x 2 shards" in stdout
    assert_same_losses(losses(one_process), losses(tmp_path))


def test_a_checkpoint_from_two_processes_resumes_on_one(one_process, two_processes_fsdp, tmp_path):
    shutil.copytree(two_processes_fsdp[0], tmp_path, dirs_exist_ok=True)
    rewind_to_step_4(tmp_path)
    stdout = run(1, ["train", f"--out_dir={tmp_path}", "--resume", f"--batch_size={GLOBAL_BATCH}"]).stdout
    assert "resumed at step 4" in stdout
    assert_same_losses(losses(one_process), losses(tmp_path), steps=range(5, STEPS + 1))


def test_a_checkpoint_from_one_process_resumes_on_two(one_process, tmp_path):
    shutil.copytree(one_process, tmp_path, dirs_exist_ok=True)
    rewind_to_step_4(tmp_path)
    stdout = run(2, ["train", f"--out_dir={tmp_path}", "--resume", f"--batch_size={GLOBAL_BATCH // 2}"]).stdout
    assert "resumed at step 4" in stdout and "fsdp over 2 processes" in stdout
    assert_same_losses(losses(one_process), losses(tmp_path), steps=range(5, STEPS + 1))


def test_ctrl_c_to_torchrun_saves_the_last_step_of_every_shard_and_it_resumes(char_dataset, tmp_path):
    """SIGINT to torchrun, which forwards it to its workers: they finish the step they are in, save it
    together (each its shard) and stop; nothing but that step's remainder is lost, and the run resumes."""
    import signal
    import time

    arguments = command_line(char_dataset, tmp_path, f"--batch_size={GLOBAL_BATCH // 2}", "--parallel=fsdp")
    arguments = [argument for argument in arguments if not argument.startswith("--max_steps")] + ["--max_steps=100000"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*launcher, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "metrics.jsonl").exists() or max(losses(tmp_path), default=0) < 6:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.05)
        job.send_signal(signal.SIGINT)
        stdout, _ = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode != 0
    last = max(losses(tmp_path))
    assert f"interrupted: saved {tmp_path / 'checkpoints' / f'step_{last:06d}'}" in stdout
    checkpoint = tmp_path / "checkpoints" / f"step_{last:06d}"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert sorted(path.name for path in (checkpoint / "shards").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    resumed = run(1, ["train", f"--out_dir={tmp_path}", "--resume", f"--max_steps={last + 2}",
                      f"--batch_size={GLOBAL_BATCH}"]).stdout  # fmt: skip
    assert f"resumed at step {last}" in resumed and max(losses(tmp_path)) == last + 2


def test_a_ddp_checkpoint_is_refused_by_sharded_processes_with_what_to_do(char_dataset, tmp_path):
    run(1, command_line(char_dataset, tmp_path, "--batch_size=4", "--max_steps=1"))  # parallel=ddp: one state.pt
    result = run(2, ["train", f"--out_dir={tmp_path}", "--resume", "--max_steps=2", "--parallel=fsdp"], False)
    assert result.returncode != 0
    # Each process's one `error:` line (torchrun then adds its own report of the failed processes).
    (line, *_) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "was written by a parallel=ddp run" in line and "resume it with --parallel ddp" in line


def test_activation_checkpointing_alone_keeps_losses_and_weight_names(char_dataset, tmp_path):
    from lmforge.formats.checkpoint import load_model
    from lmforge.training.pretrain import train

    def config(out_dir, **overrides):
        return train_config_from({"preset": "tiny", "data_dir": str(char_dataset), "out_dir": str(out_dir),
                                  "batch_size": 4, "max_steps": 4, "eval_interval": 0, "log_interval": 1,
                                  "progress": "none", "plot": False, "peak_flops": 1e11} | overrides)  # fmt: skip

    train(config(tmp_path / "plain"))
    train(config(tmp_path / "recomputed", activation_checkpointing=True))
    plain, recomputed = losses(tmp_path / "plain"), losses(tmp_path / "recomputed")
    assert plain.keys() == recomputed.keys() and all(abs(plain[s] - recomputed[s]) < 1e-6 for s in plain)
    # The checkpoint holds the model's own names, not the wrapper's: it loads into a plain model.
    model, _, _ = load_model(tmp_path / "recomputed")
    assert not any("_checkpoint_wrapped_module" in name for name in model.state_dict())


def test_parallelize_alone_wraps_blocks_for_recomputation_and_nothing_else(char_dataset):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from lmforge.model import Transformer

    config = train_config_from({"preset": "tiny", "activation_checkpointing": True, "parallel": "fsdp"})
    model = Transformer(config.model)
    before = model(torch.tensor([[1, 2, 3]]))[0]
    assert parallelize(model, config, mesh=None) is model
    assert all(isinstance(block, CheckpointWrapper) for block in model.blocks)
    assert torch.equal(model(torch.tensor([[1, 2, 3]]))[0], before)


def test_parallel_settings_are_checked_where_they_arrive():
    with pytest.raises(LmforgeError, match=r"parallel='tp': expected one of \('ddp', 'fsdp', 'hsdp'\)"):
        train_config_from({"parallel": "tp"})
    with pytest.raises(LmforgeError, match="hsdp_shard_processes must be >= 0"):
        train_config_from({"hsdp_shard_processes": -1})
    config = train_config_from({"parallel": "hsdp", "hsdp_shard_processes": 3})
    with pytest.raises(LmforgeError, match="4 processes do not split into shard groups of 3"):
        device_mesh(config, distributed.ProcessGroup(rank=0, world_size=4), torch.device("cpu"))
    assert device_mesh(config, distributed.ProcessGroup(), torch.device("cpu")) is None  # alone: no mesh


def test_mixed_precision_is_bf16_with_fp32_reduction_on_cuda_and_fp32_on_cpu(monkeypatch):
    # The decision alone, so it is checked without a GPU.
    assert mixed_precision_for(torch.device("cpu")).param_dtype is None  # the parameters' own: fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    policy = mixed_precision_for(torch.device("cuda", 0))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
