import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.formats.checkpoint import load_model, resolve_checkpoint
from lmforge.training.pretrain import TrainingDiverged, learning_rate_at, read_metrics, train, train_config_from


def tiny_config(data_dir, out_dir, **overrides):
    values = {
        "preset": "tiny",
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "batch_size": 4,
        "max_steps": 20,
        "eval_interval": 10,
        "eval_tokens": 512,
        "log_interval": 1,
        "warmup_steps": 5,
        "learning_rate": 3e-3,
        "progress": "none",
        "plot": False,
        "peak_flops": 1e11,
    }
    return train_config_from(values | overrides)


def losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r}


def test_learning_rate_schedule_closed_form():
    config = train_config_from({"learning_rate": 1.0, "min_learning_rate": 0.1, "warmup_steps": 10, "max_steps": 110})
    assert learning_rate_at(0, config) == pytest.approx(0.1)
    assert learning_rate_at(9, config) == pytest.approx(1.0)
    assert learning_rate_at(60, config) == pytest.approx(0.55)  # halfway down the cosine
    assert learning_rate_at(110, config) == pytest.approx(0.1)


def test_default_warmup_scales_to_the_run():
    short = train_config_from({"learning_rate": 1.0, "min_learning_rate": 0.1, "max_steps": 50})
    assert short.warmup_steps is None  # resolved per run: a tenth of 50 steps
    assert learning_rate_at(0, short) == pytest.approx(0.2)
    assert learning_rate_at(4, short) == pytest.approx(1.0)
    long = train_config_from({"learning_rate": 1.0, "min_learning_rate": 0.1, "max_steps": 5000})
    assert learning_rate_at(98, long) == pytest.approx(0.99) and learning_rate_at(99, long) == pytest.approx(1.0)


def test_summary_says_whether_the_schedule_peaked(char_dataset, tmp_path, capsys):
    summary = train(tiny_config(char_dataset, tmp_path / "short", max_steps=4, warmup_steps=10, eval_interval=0))
    assert summary["reached_peak_learning_rate"] is False and summary["warmup_steps"] == 10
    assert "warmup_steps=10 is longer than the run's 4 optimizer steps" in capsys.readouterr().err
    summary = train(tiny_config(char_dataset, tmp_path / "default", max_steps=4, warmup_steps=None, eval_interval=0))
    assert summary["reached_peak_learning_rate"] is True and summary["warmup_steps"] == 0
    assert json.loads((tmp_path / "default" / "config.json").read_text())["warmup_steps"] == 0


def test_training_reduces_loss_and_writes_outputs(char_dataset, tmp_path):
    summary = train(tiny_config(char_dataset, tmp_path, max_steps=60, eval_interval=30, plot=True))
    recorded = losses(tmp_path)
    assert sorted(recorded) == list(range(1, 61))
    assert recorded[60] < recorded[1] - 1.0
    assert summary["val"]["loss"] < math.log(summary_vocab(tmp_path))
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert resolve_checkpoint(tmp_path).name == "step_000060"
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert any("val_bits_per_byte" in r for r in metrics)
    assert all(r["tokens_per_second"] > 0 and 0 < r["mfu"] for r in metrics if "mfu" in r)


def summary_vocab(out_dir):
    return load_model(out_dir)[0].config.vocab_size


def test_resume_is_bit_exact(char_dataset, tmp_path):
    # Dropout draws from the global RNG, and peak_flops unset makes each run measure a matmul at
    # start-up: nothing between restoring the RNG state and the first step may draw from it.
    settings = {"model": {"dropout": 0.1}, "peak_flops": None}
    straight = tmp_path / "straight"
    train(tiny_config(char_dataset, straight, **settings))

    interrupted = tmp_path / "interrupted"

    def crash(step, loss):
        if step == 13:  # past the step-10 checkpoint: steps 11-13 are lost with the process
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(char_dataset, interrupted, **settings), on_step=crash)
    assert resolve_checkpoint(interrupted).name == "step_000010"
    train(tiny_config(char_dataset, interrupted, resume=True, **settings))

    expected = losses(straight)
    resumed = {}
    for record in read_metrics(interrupted / "metrics.jsonl"):
        if "loss" in record:
            resumed[record["step"]] = record["loss"]  # the replayed steps 11-13 overwrite the lost ones
    assert resumed == expected
    a, _, _ = load_model(straight)
    b, _, _ = load_model(interrupted)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_ctrl_c_saves_the_last_completed_step_and_resumes_exactly(char_dataset, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(char_dataset, straight))
    interrupted = tmp_path / "interrupted"

    def press_ctrl_c(step, loss):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(char_dataset, interrupted), on_step=press_ctrl_c)
    assert resolve_checkpoint(interrupted).name == "step_000013"
    train(tiny_config(char_dataset, interrupted, resume=True))
    assert losses(interrupted) == losses(straight)


def test_ctrl_c_in_the_middle_of_a_step_saves_the_step_before(char_dataset, tmp_path, monkeypatch):
    from lmforge import model as model_module

    straight = tmp_path / "straight"
    train(tiny_config(char_dataset, straight, **{"model": {"dropout": 0.1}}))
    original = model_module.Transformer.forward
    calls = {"training": 0}

    def interrupted_forward(self, tokens, targets=None, cache=None):
        if self.training:
            calls["training"] += 1
            if calls["training"] == 14:  # inside step 14, after its batch and dropout RNG were drawn
                raise KeyboardInterrupt
        return original(self, tokens, targets, cache)

    monkeypatch.setattr(model_module.Transformer, "forward", interrupted_forward)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(char_dataset, interrupted, **{"model": {"dropout": 0.1}}))
    monkeypatch.setattr(model_module.Transformer, "forward", original)
    assert resolve_checkpoint(interrupted).name == "step_000013"
    train(tiny_config(char_dataset, interrupted, resume=True, **{"model": {"dropout": 0.1}}))
    assert losses(interrupted) == losses(straight)


def test_nan_loss_stops_and_keeps_last_checkpoint(char_dataset, tmp_path, monkeypatch):
    from lmforge import model as model_module

    original = model_module.Transformer.forward

    def poisoned(self, tokens, targets=None, cache=None):
        logits, loss = original(self, tokens, targets, cache)
        if self.training and poisoned.calls >= 12:
            loss = loss * float("nan")
        poisoned.calls += self.training
        return logits, loss

    poisoned.calls = 0
    monkeypatch.setattr(model_module.Transformer, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 13.*step_000010"):
        train(tiny_config(char_dataset, tmp_path))
    assert resolve_checkpoint(tmp_path).name == "step_000010"
    load_model(tmp_path)  # still whole


def test_leftover_temporary_checkpoint_is_ignored(char_dataset, tmp_path):
    train(tiny_config(char_dataset, tmp_path, max_steps=10))
    (tmp_path / "checkpoints" / ".step_000020.tmp").mkdir()  # a crash mid-write
    assert resolve_checkpoint(tmp_path).name == "step_000010"
    train(tiny_config(char_dataset, tmp_path, resume=True, max_steps=20))
    assert resolve_checkpoint(tmp_path).name == "step_000020"
    assert not (tmp_path / "checkpoints" / ".step_000020.tmp").exists()


def test_gradient_accumulation_matches_one_big_batch(char_dataset, tmp_path):
    train(tiny_config(char_dataset, tmp_path / "big", batch_size=8, max_steps=5))
    train(tiny_config(char_dataset, tmp_path / "accumulated", batch_size=4, grad_accum_steps=2, max_steps=5))
    big, accumulated = losses(tmp_path / "big"), losses(tmp_path / "accumulated")
    for step in big:
        assert accumulated[step] == pytest.approx(big[step], abs=1e-5)


def test_ddp_two_processes_match_one_process(char_dataset, tmp_path):
    common = [
        "--preset=tiny",
        f"--data_dir={char_dataset}",
        "--max_steps=8",
        "--eval_interval=0",
        "--log_interval=1",
        "--progress=none",
        "--plot=false",
        "--peak_flops=1e11",
        "--warmup_steps=2",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", *common, "--batch_size=8", f"--out_dir={tmp_path / 'single'}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lmforge",
            "train",
            *common,
            "--batch_size=4",
            f"--out_dir={tmp_path / 'ddp'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["batch_size"] == 4


def test_a_second_run_into_a_used_out_dir_is_refused(char_dataset, tmp_path):
    train(tiny_config(char_dataset, tmp_path, max_steps=3, eval_interval=0))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(LmforgeError, match=r"already holds a run .*--resume.*new out_dir.*--overwrite"):
        train(tiny_config(char_dataset, tmp_path, max_steps=3, eval_interval=0))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    with pytest.raises(LmforgeError, match="choose one"):
        train(tiny_config(char_dataset, tmp_path, resume=True, overwrite=True))
    (tmp_path / "empty").mkdir()
    train(tiny_config(char_dataset, tmp_path / "empty", max_steps=1, eval_interval=0))  # an empty folder is free


def test_overwrite_archives_the_previous_run_and_leaves_one_run(char_dataset, tmp_path):
    train(tiny_config(char_dataset, tmp_path, max_steps=6, checkpoint_interval=3, eval_interval=0))
    old_metrics = (tmp_path / "metrics.jsonl").read_text()
    train(tiny_config(char_dataset, tmp_path, max_steps=4, eval_interval=0, plot=True, overwrite=True))
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]  # the new run's steps only
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000004"]
    (archive,) = tmp_path.glob("previous-*")
    assert (archive / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (archive / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000006"]
    assert resolve_checkpoint(archive).name == "step_000006"  # the old run stays loadable
    assert {p.name for p in tmp_path.iterdir()} == {
        "checkpoints", "config.json", "metrics.jsonl", "loss_curve.png", archive.name
    }  # fmt: skip


def test_cli_refuses_a_used_out_dir_and_resume_keeps_the_recorded_settings(char_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--preset=tiny", "--batch_size=4", "--eval_interval=0", "--progress=none", "--plot=false",
              "--peak_flops=1e11", f"--out_dir={run}"]  # fmt: skip
    assert main(["train", *common, f"--data_dir={char_dataset}", "--max_steps=3", "--learning_rate=1e-3"]) == 0
    capsys.readouterr()
    assert main(["train", *common, f"--data_dir={char_dataset}", "--max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} already holds a run") and "--resume" in err and "--overwrite" in err
    # Resuming with neither the data nor the settings given: config.json's are used, and it records them.
    assert main(["train", f"--out_dir={run}", "--resume", "--max_steps=5", "--progress=none"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 5
    recorded = json.loads((run / "config.json").read_text())
    assert "resume" not in recorded and "overwrite" not in recorded
    assert recorded["learning_rate"] == 1e-3 and recorded["data_dir"] == str(char_dataset)
    assert recorded["max_steps"] == 5 and recorded["model"]["n_layers"] == load_model(run)[0].config.n_layers
    checkpoint_config = json.loads((run / "checkpoints" / "step_000005" / "config.json").read_text())
    assert "resume" not in checkpoint_config["train"]
    assert main(["train", *common, f"--data_dir={char_dataset}", "--max_steps=2", "--overwrite"]) == 0
    assert len(list(run.glob("previous-*"))) == 1 and sorted(losses(run)) == [2]  # logged at the last step only
