"""Past one machine on one machine: two torchrun launchers as two "nodes" meeting at a c10d
rendezvous on 127.0.0.1, and an elastic job that loses a process and goes on from its last checkpoint
(the README's "Multi-node" section runs the same commands)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.formats.checkpoint import resolve_checkpoint
from lmforge.training.distributed import restart_warning
from lmforge.training.pretrain import read_metrics, train

from .test_pretrain import losses, tiny_config

COMMON = [
    "--preset=tiny",
    "--eval_interval=0",
    "--log_interval=1",
    "--progress=none",
    "--plot=false",
    "--peak_flops=1e11",
    "--warmup_steps=2",
    "--learning_rate=3e-3",  # tiny_config's, for the one-process runs compared with
]
# One thread per process: two or three processes share this machine's cores.
ENVIRONMENT = os.environ | {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", "lmforge", "train", *COMMON]


def test_two_nodes_meeting_at_a_c10d_rendezvous_train_as_one_process(char_dataset, tmp_path):
    train(tiny_config(char_dataset, tmp_path / "single", batch_size=8, max_steps=2, eval_interval=0, warmup_steps=2))
    port = free_port()
    node = torchrun(
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=test-two-nodes",
        "--local-addr=127.0.0.1",  # what the other node dials; this machine's hostname may not resolve
    )
    arguments = [f"--data_dir={char_dataset}", "--batch_size=4", "--max_steps=2", f"--out_dir={tmp_path / 'nodes'}"]
    launchers = [
        subprocess.Popen(
            [*node, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT
        )
        for _ in range(2)
    ]
    outputs = [launcher.communicate(timeout=240) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, outputs):
        assert launcher.returncode == 0, stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "nodes")
    assert sorted(two) == [1, 2]
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])


def worker_processes(launcher_pid: int) -> list[int]:
    """The training processes torchrun started: its children (on Linux, listed per thread)."""
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def latest_checkpoint(run: Path) -> str:
    """What `latest` names ("" before the first): written after its folder, so a resume starts there."""
    try:
        return (run / "checkpoints" / "latest").read_text().strip()
    except FileNotFoundError:
        return ""


# ddp: process 0 writes one checkpoint; fsdp: every process writes its shard (torch.distributed.checkpoint)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_an_elastic_job_that_loses_a_process_resumes_from_its_last_checkpoint(char_dataset, tmp_path, parallel):
    steps = 30
    run = tmp_path / "elastic"
    command = torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1")
    arguments = [f"--data_dir={char_dataset}", "--batch_size=4", f"--max_steps={steps}", f"--out_dir={run}"]
    arguments.append(f"--parallel={parallel}")
    # --resume from the first launch: the attempt torchrun restarts runs the same command and continues.
    launcher = subprocess.Popen(
        [*command, *arguments, "--checkpoint_interval=5", "--keep_checkpoints=50", "--progress=plain", "--resume"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # torchrun's store, shared with the workers by default, would hand the restart stale keys
        env=ENVIRONMENT | {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint(run) < "step_000010":  # two checkpoints in, well before the end
            assert launcher.poll() is None and time.monotonic() < deadline, "the job ended before its checkpoint"
            time.sleep(0.02)
        os.kill(max(worker_processes(launcher.pid)), signal.SIGKILL)  # one of the two, without warning
        stdout, stderr = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]
    assert "a restart would hang" not in stderr
    resumed_lines = [line for line in stdout.splitlines() if "resumed at step" in line]
    assert len(resumed_lines) == 1, stdout  # the first attempt started the run; the restart resumed it, once
    resumed_at = int(resumed_lines[0].rsplit("resumed at step", 1)[1].split()[0])
    assert resumed_at >= 10 and resumed_at % 5 == 0
    # metrics.jsonl: steps 1..k of the first attempt, then the restart's from its checkpoint on; the
    # steps lost are those since that checkpoint (5 at most, one checkpoint interval).
    recorded = [record["step"] for record in read_metrics(run / "metrics.jsonl") if "loss" in record]
    first_attempt = len(recorded) - (steps - resumed_at)
    assert recorded == [*range(1, first_attempt + 1), *range(resumed_at + 1, steps + 1)]
    assert resumed_at <= first_attempt <= resumed_at + 5
    assert resolve_checkpoint(run).name == f"step_{steps:06d}"

    # Nothing lost: the losses are those of an uninterrupted run with the same global batch.
    train(tiny_config(char_dataset, tmp_path / "straight", batch_size=8, max_steps=steps, eval_interval=0,
                      warmup_steps=2))  # fmt: skip
    straight, elastic = losses(tmp_path / "straight"), losses(run)
    assert sorted(elastic) == list(range(1, steps + 1))
    for step in straight:
        assert abs(straight[step] - elastic[step]) < 1e-4, (step, straight[step], elastic[step])


def test_a_restartable_job_sharing_torchruns_store_is_warned_about():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_warning(shared)
    assert restart_warning(shared | {"TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_warning(shared | {"TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_warning({}) is None  # not under torchrun
