"""One run per output folder: a second run into a folder that holds one is refused, unless it
resumes that run or is told to `overwrite` it, which moves the old run into
`FOLDER/previous-<date>-<time>/` first (nothing is deleted). Without this, two runs mix: metrics
appended to the old ones, old checkpoints beside new ones, one loss curve zig-zagging through both.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.settings import FOLDER_ACTIONS

ARCHIVE_PREFIX = "previous-"
TRAINING_STATE = "training_state.pt"  # a fine-tune's `fit` checkpoint in its folder, gone once the run completes
SHARDED_TRAINING_STATE = "training_state"  # the same as a folder of shards, under parallel=fsdp/hsdp


def settings_to_record(config) -> dict:
    """A run config as it is recorded beside the run (config.json, metrics.json): without FOLDER_ACTIONS."""
    return {key: value for key, value in asdict(config).items() if key not in FOLDER_ACTIONS}


def claim_run_folder(folder: str | Path, run_files: tuple[str, ...], overwrite: bool, alternatives: str) -> Path | None:
    """Make `folder` free for a new run: refused (LmforgeError) while it holds `run_files` of an
    earlier run, unless `overwrite`; then those files move into `folder/previous-<date>-<time>/`,
    which is returned. `alternatives` completes the refusal: what else the user can do."""
    folder = Path(folder)
    found = [name for name in run_files if (folder / name).exists()]
    if not found:
        return None
    if not overwrite:
        raise LmforgeError(
            f"{folder} already holds a run ({', '.join(found)}); {alternatives}, or pass --overwrite to move "
            f"the old run into {folder / (ARCHIVE_PREFIX + '<date>-<time>')} and start afresh"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive, copies = folder / f"{ARCHIVE_PREFIX}{stamp}", 1
    while archive.exists():  # two overwrites within a second
        copies += 1
        archive = folder / f"{ARCHIVE_PREFIX}{stamp}-{copies}"
    archive.mkdir()
    for name in found:
        (folder / name).rename(archive / name)
    return archive


def claim_fine_tune_folder(folder: Path, run_files: tuple[str, ...], config, what: str, verbose: int) -> None:
    """A fine-tune's `out`: left as it is to resume (`config.resume`), else claimed for a new run as
    `claim_run_folder` does, saying where `--overwrite` moved the previous `what`."""
    if config.resume:
        return
    alternatives = "choose a new --out, or continue an interrupted run with --resume=true"
    archived = claim_run_folder(folder, run_files, config.overwrite, alternatives)
    if archived is not None and verbose:
        print(f"--overwrite: moved the previous {what} into {archived}")


def fine_tune_checkpointing(folder: Path, config, sharded: bool = False) -> dict:
    """`fit`'s checkpoint options for a fine-tune writing into `folder`: its training state there (a folder
    of shards when `sharded`), every `config.checkpoint_interval` optimizer steps, resumed when `config.resume`."""
    state, other = (SHARDED_TRAINING_STATE, TRAINING_STATE) if sharded else (TRAINING_STATE, SHARDED_TRAINING_STATE)
    if config.resume and not (folder / state).exists() and (folder / other).exists():
        written_by = "ddp" if sharded else "fsdp or hsdp"
        raise LmforgeError(
            f"{folder / other} was written by a parallel={written_by} run; resume it with --parallel {written_by}"
        )
    return {
        "checkpoint": folder / state,
        "checkpoint_every": config.checkpoint_interval,
        "resume": config.resume,
    }
