"""Damaged checkpoints and occupied output paths: `lmforge train --resume` and `prepare` answer with
`error: PATH: ...` and exit 2 (never a traceback), and a damaged `latest` falls back to the newest
complete checkpoint, saying so."""

import os
import pickle
import shutil

import pytest
import torch

from lmforge.cli import main
from lmforge.formats.checkpoint import resolve_checkpoint

COMMON = [
    "--preset=tiny",
    "--batch_size=4",
    "--eval_interval=0",
    "--log_interval=1",
    "--progress=none",
    "--plot=false",
    "--peak_flops=1e11",
    "--warmup_steps=2",
]


def lmforge(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the real CLI, run in this process."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, path) -> None:
    assert code == 2, err
    assert err.startswith(f"error: {path}"), err
    assert "Traceback" not in err and "weights_only=False" not in err and "weights_only` set to `False" not in err


@pytest.fixture(scope="module")
def finished_run(char_dataset, tmp_path_factory):
    """A 6-step run with whole checkpoints at steps 3 and 6; tests damage copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    code = main(["train", *COMMON, f"--data_dir={char_dataset}", f"--out_dir={run}", "--max_steps=6",
                 "--checkpoint_interval=3"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000006"]
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def resume(capsys, char_dataset, run, max_steps=8):
    return lmforge(capsys, "train", *COMMON, f"--data_dir={char_dataset}", f"--out_dir={run}",
                   f"--max_steps={max_steps}", "--resume")  # fmt: skip


class Hostile:
    """Unpickling this runs a shell command: a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing keys", "not a dict"])
def test_damaged_state_is_a_clean_error(capsys, char_dataset, run, damage):
    state = run / "checkpoints" / "step_000006" / "state.pt"
    if damage == "truncated":
        truncate(state, state.stat().st_size // 2)
    elif damage == "empty":
        truncate(state, 0)
    elif damage == "missing keys":
        torch.save({"step": 6}, state)
    else:
        torch.save([1, 2, 3], state)
    code, _, err = resume(capsys, char_dataset, run)
    assert_clean_error(code, err, state)
    # The older checkpoint is whole; the message says how to resume from it.
    assert "step_000003" in err


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_hostile_pickle_never_runs(capsys, char_dataset, run, tmp_path, how):
    marker = tmp_path / "pwned"
    state = run / "checkpoints" / "step_000006" / "state.pt"
    payload = {"step": 6, "optimizer": Hostile(marker), "torch_rng": None, "data_rng": None}
    if how == "torch.save":
        torch.save(payload, state)
    else:
        state.write_bytes(pickle.dumps(payload))
    code, _, err = resume(capsys, char_dataset, run)
    assert_clean_error(code, err, state)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "no model", "bad model value"])
def test_damaged_config_is_a_clean_error(capsys, char_dataset, run, damage):
    config = run / "checkpoints" / "step_000006" / "config.json"
    if damage == "truncated":
        truncate(config, 50)
    elif damage == "no model":
        config.write_text('{"step": 6}')
    else:
        config.write_text('{"model": {"n_layers": "many"}}')
    code, _, err = resume(capsys, char_dataset, run)
    assert_clean_error(code, err, config)


def test_truncated_weights_are_a_clean_error(capsys, char_dataset, run):
    weights = run / "checkpoints" / "step_000006" / "model.safetensors"
    truncate(weights, weights.stat().st_size - 100)
    code, _, err = resume(capsys, char_dataset, run)
    assert_clean_error(code, err, weights)


def test_optimizer_state_of_another_model_is_a_clean_error(capsys, char_dataset, run):
    state_path = run / "checkpoints" / "step_000006" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = [0]  # a model with a single matrix
    torch.save(state, state_path)
    code, _, err = resume(capsys, char_dataset, run)
    assert_clean_error(code, err, state_path)


@pytest.mark.parametrize(
    "latest_text, make_folder, problem",
    [
        ("step_000099", False, "does not exist"),
        ("step_000099", True, "is empty"),
        ("../../../../etc", False, "outside"),
        ("", False, "is empty"),
        (None, False, "missing"),
    ],
)
def test_damaged_latest_resumes_from_newest_complete_checkpoint(
    capsys, char_dataset, run, latest_text, make_folder, problem
):
    checkpoints = run / "checkpoints"
    if make_folder:
        (checkpoints / latest_text).mkdir()
    if latest_text is None:
        (checkpoints / "latest").unlink()
    else:
        (checkpoints / "latest").write_text(latest_text + "\n")
    code, out, err = resume(capsys, char_dataset, run)
    assert code == 0, err
    assert "Traceback" not in err
    notice = [line for line in err.splitlines() if "step_000006" in line]
    assert notice and problem in notice[0] and "newest complete" in notice[0], err
    assert '"step": 8' in out
    assert resolve_checkpoint(run).name == "step_000008"
    assert (checkpoints / "step_000006" / "state.pt").exists()  # kept: a made-up step folder does not count


def test_damaged_latest_skips_incomplete_checkpoints(capsys, char_dataset, run):
    checkpoints = run / "checkpoints"
    (checkpoints / "latest").write_text("step_000099")
    truncate(checkpoints / "step_000006" / "state.pt", 10)
    code, _, err = resume(capsys, char_dataset, run, max_steps=4)
    assert code == 0, err
    assert "step_000003" in err and "newest complete" in err
    assert resolve_checkpoint(run).name == "step_000004"


def test_damaged_latest_without_a_complete_checkpoint_is_a_clean_error(capsys, char_dataset, run):
    checkpoints = run / "checkpoints"
    (checkpoints / "latest").write_text("../../../../etc")
    for step in ("step_000003", "step_000006"):
        (checkpoints / step / "state.pt").unlink()
    code, _, err = resume(capsys, char_dataset, run)
    assert_clean_error(code, err, checkpoints / "latest")
    assert "no complete checkpoint" in err


def test_generate_refuses_latest_outside_the_run(capsys, run):
    (run / "checkpoints" / "latest").write_text("../../../../etc")
    code, _, err = lmforge(capsys, "generate", "--model", run, "--prompt", "KING.")
    assert_clean_error(code, err, run / "checkpoints" / "latest")


def test_prepare_onto_an_existing_file_is_a_clean_error(capsys, corpus_file, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder")
    code, _, err = lmforge(capsys, "prepare", corpus_file, "--out", occupied)
    assert_clean_error(code, err, occupied)
    assert "remove the file" in err and occupied.read_text() == "not a folder"


def test_prepare_under_an_existing_file_is_a_clean_error(capsys, corpus_file, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder")
    code, _, err = lmforge(capsys, "prepare", corpus_file, "--out", occupied / "data")
    assert_clean_error(code, err, occupied / "data")


def test_train_into_an_existing_file_is_a_clean_error(capsys, char_dataset, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder")
    code, _, err = lmforge(capsys, "train", *COMMON, f"--data_dir={char_dataset}", f"--out_dir={occupied}",
                           "--max_steps=1")  # fmt: skip
    assert_clean_error(code, err, occupied)
    assert occupied.read_text() == "not a folder"
