import json
import subprocess
import sys

import pytest

from lmforge.cli import main


def lmforge(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_end_to_end_prepare_train_resume_generate_eval(tmp_path, corpus_file):
    data, run = tmp_path / "data", tmp_path / "run"
    prepared = lmforge("prepare", corpus_file, "--out", data, "--tokenizer", "bpe", "--vocab-size", "300")
    assert "train" in prepared.stdout and (data / "manifest.json").exists()
    (tmp_path / "train.yaml").write_text(
        f"preset: tiny\ndata_dir: {data}\nout_dir: {run}\nbatch_size: 4\n"
        "eval_interval: 5\neval_tokens: 256\nlog_interval: 1\nprogress: plain\n"
    )
    first = lmforge("train", "--config", tmp_path / "train.yaml", "--max_steps=5", "--model.n_layers=1")
    assert "step 5/5" in first.stdout and "val loss" in first.stdout
    second = lmforge("train", "--config", tmp_path / "train.yaml", "--max_steps=10", "--resume")
    assert "resumed at step 5" in second.stdout and "step 10/10" in second.stdout
    assert json.loads((run / "checkpoints" / "step_000010" / "config.json").read_text())["model"]["n_layers"] == 1

    generated = lmforge("generate", "--model", run, "--prompt", "KING.", "--max_new_tokens=20", "--seed=1")
    assert generated.stdout.startswith("KING.") and len(generated.stdout) > len("KING.\n")
    evaluated = lmforge("eval", "--model", run, "--data-dir", data, "--json", tmp_path / "eval.json")
    assert "perplexity" in evaluated.stdout
    result = json.loads((tmp_path / "eval.json").read_text())["metrics"]["val"]
    assert result["bits_per_byte"] > 0 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"])

    lmforge("export", "--model", run, "--format", "hf", "--out", tmp_path / "hf")
    lmforge("export", "--model", run, "--format", "gguf", "--dtype", "q8_0", "--out", tmp_path / "m.gguf")
    for exported in (tmp_path / "hf", tmp_path / "m.gguf"):
        again = lmforge("generate", "--model", exported, "--prompt", "KING.", "--max_new_tokens=20", "--seed=1")
        assert again.stdout.startswith("KING.")
    hf_greedy = lmforge(
        "generate", "--model", tmp_path / "hf", "--prompt", "KING.", "--max_new_tokens=20", "--temperature=0"
    )
    run_greedy = lmforge("generate", "--model", run, "--prompt", "KING.", "--max_new_tokens=20", "--temperature=0")
    assert hf_greedy.stdout == run_greedy.stdout
    # speculative decoding with the exported int8 GGUF as the draft: the same greedy text
    speculative = lmforge("generate", "--model", run, "--draft", tmp_path / "m.gguf", "--prompt", "KING.",
                          "--max_new_tokens=20")  # fmt: skip
    assert speculative.stdout == run_greedy.stdout


@pytest.mark.parametrize("verb", [None, "prepare", "train", "generate", "eval", "quickstart"])
def test_help_for_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"] if verb else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lmforge" in out
    if verb == "train":
        assert "--model.n_kv_heads" in out and "--learning_rate" in out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", f"--data_dir={tmp_path}", "--max_stpes=3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert main(["train", f"--data_dir={tmp_path}"]) == 2
    assert "run `lmforge prepare`" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path)]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    assert main(["prepare", "--out", str(tmp_path / "o")]) == 2
    assert "nothing to prepare" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train", "quickstart"])
def test_help_explains_overwrite(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert "--overwrite" in out and "OUT/previous-<date>-<time>/" in out
