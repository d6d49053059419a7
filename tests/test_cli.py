import argparse
import ast
import json
import re
import subprocess
import sys
from dataclasses import fields, is_dataclass

import pytest

from lmforge.apps.diffusion import DiffusionConfig
from lmforge.apps.gan import GANConfig
from lmforge.apps.recommend import RecommendConfig
from lmforge.cli import build_parser, main, options_with_dashes, progress_bars
from lmforge.finetune.classify import ClassifyConfig
from lmforge.finetune.sft import SFTConfig
from lmforge.inference.chat import ChatSession
from lmforge.inference.generate import SamplingConfig
from lmforge.serve import ServeConfig
from lmforge.settings import VisionChatConfig
from lmforge.training.pretrain import train_config_from

from .conftest import skip_without_smollm2


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
        assert "--model.n-kv-heads" in out and "--learning-rate" in out


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


def help_of(verb: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    return capsys.readouterr().out


def config_tables(help_text: str) -> dict[str, dict]:
    """The key tables of a `--help` page: {title: {key: default}}, the defaults read back as Python values."""
    tables, rows = {}, None
    for line in help_text.splitlines():
        heading = re.match(r"^(\S.*?) \(--key value", line)
        row = re.match(r"^  --(\S+)\s+.+? default (.+)$", line)
        if heading:
            rows = tables[heading.group(1)] = {}
        elif row and rows is not None:
            rows[row.group(1)] = ast.literal_eval(row.group(2))
        elif not line.strip():
            rows = None
    return tables


def values_by_option(config, prefix: str = "") -> dict:
    values = {}
    for field in fields(config):
        value = getattr(config, field.name)
        if is_dataclass(value):
            values.update(values_by_option(value, f"{prefix}{field.name}."))
        else:
            values[f"{prefix}{field.name}".replace("_", "-")] = value
    return values


@pytest.mark.parametrize(
    "verb, title, used",
    [
        # what each verb really starts from: the chat session's own sampling, train's config builder, ...
        ("chat", "config keys", lambda: ChatSession(model=None, tokenizer=None).sampling),
        ("generate", "config keys", SamplingConfig),
        ("train", "config keys", lambda: train_config_from({})),
        ("serve", "config keys", ServeConfig),
        ("recommend", "train keys", RecommendConfig),
        ("train-image", "--model diffusion keys", DiffusionConfig),
        ("train-image", "--model gan keys", GANConfig),
        ("finetune", "--task classify keys", ClassifyConfig),
        ("finetune", "--task sft keys", SFTConfig),
        ("finetune", "--task vision-chat keys", VisionChatConfig),
    ],
)
def test_help_shows_the_defaults_each_verb_uses(verb, title, used, capsys):
    tables = config_tables(help_of(verb, capsys))
    assert tables[title] == values_by_option(used())


def test_help_defaults_are_the_ones_the_issue_found_wrong(capsys):
    chat = config_tables(help_of("chat", capsys))["config keys"]
    assert (chat["temperature"], chat["max-new-tokens"], chat["repetition-penalty"], chat["top-p"]) == (
        0.2, 512, 1.1, 0.9,
    )  # fmt: skip
    train = config_tables(help_of("train", capsys))["config keys"]
    assert [train[f"model.{key}"] for key in ("norm", "mlp", "positions", "d-model", "bias")] == [
        "rmsnorm", "swiglu", "rope", 192, False,
    ]  # fmt: skip


def test_every_verb_and_option_says_what_it_does():
    parser = build_parser()
    (verbs,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert verbs.help
    undescribed = [verb for verb, verb_parser in verbs.choices.items() if not verb_parser.description]
    unexplained = [
        f"{verb} {'/'.join(action.option_strings) or action.dest}"
        for verb, verb_parser in verbs.choices.items()
        for action in verb_parser._actions
        if not action.help
    ]
    assert (undescribed, unexplained) == ([], [])


def test_options_show_dashes_and_take_underscores_too(corpus_file, tmp_path, capsys):
    parser = build_parser()
    (verbs,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for verb in verbs.choices:
        assert not re.findall(r"--[\w.-]*_", help_of(verb, capsys)), verb
    given = ["serve", "--max_batch", "4", "--model.n_layers=2", "--prompt=--a_b", "--", "--x_y"]
    assert options_with_dashes(given) == [
        "serve",
        "--max-batch",
        "4",
        "--model.n-layers=2",
        "--prompt=--a_b",
        "--",
        "--x_y",
    ]
    validation_tokens = []
    for spelling in ("--val-fraction", "--val_fraction"):
        out = tmp_path / spelling
        assert main(["prepare", str(corpus_file), "--out", str(out), spelling, "0.5"]) == 0
        splits = json.loads((out / "manifest.json").read_text())["splits"]
        validation_tokens.append(splits["val"]["tokens"])
        assert splits["val"]["tokens"] == pytest.approx(splits["train"]["tokens"], rel=0.05)
    assert validation_tokens[0] == validation_tokens[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_cli_imports_no_torch():
    result = run_python("import lmforge.cli, sys; print('torch' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr
    lazy = run_python(
        "import sys, lmforge; config = lmforge.preset('tiny'); print('torch' in sys.modules); "
        "lmforge.Transformer(config); print('torch' in sys.modules, lmforge.load.__module__)"
    )
    assert lazy.stdout.split() == ["False", "True", "lmforge.formats.loading"], lazy.stderr


def test_models_lists_what_the_places_hold_without_torch(tmp_path):
    import os

    from lmforge.formats.gguf import save_gguf

    from .formats.test_loading import tiny_llama
    from .formats.test_places import add_to_hf_cache, add_to_ollama

    gguf = save_gguf(*tiny_llama(), tmp_path / "tiny-Q8_0.gguf", "q8_0")
    add_to_hf_cache(tmp_path / "hf", "Org/Tiny-GGUF", {"tiny-Q8_0.gguf": gguf})
    add_to_ollama(tmp_path / "ollama", "registry.ollama.ai/library/tiny/q8", gguf)
    code = "import sys; from lmforge.cli import main; main(sys.argv[1:]); print('torch' in sys.modules)"
    environment = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hf"), "OLLAMA_MODELS": str(tmp_path / "ollama")}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=environment
    )
    table = run("models")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FROM", "ARCHITECTURE", "QUANTISATION", "SIZE", "NOTE"], table.stderr
    size = f"{gguf.stat().st_size / 1e3:.1f} KB"
    assert ["Org/Tiny-GGUF", "HF", "cache", "llama", "Q8_0", *size.split()] in [line.split() for line in lines]
    assert ["tiny:q8", "Ollama", "llama", "Q8_0", *size.split()] in [line.split() for line in lines]
    assert lines[-1] == "False" and str(tmp_path / "hf") in table.stderr
    listed = run("models", "--json")
    sizes = {item["name"]: item["size_bytes"] for item in json.loads(listed.stdout.rpartition("]")[0] + "]")}
    assert sizes.keys() == {"smollm2-135m-instruct", "Org/Tiny-GGUF", "tiny:q8"}
    assert sizes["Org/Tiny-GGUF"] == sizes["tiny:q8"] == gguf.stat().st_size


def test_help_and_argument_errors_come_before_torch_and_any_model():
    result = run_python(
        """
import sys
from lmforge.cli import build_parser, main

parser = build_parser()
(verbs,) = [action for action in parser._actions if hasattr(action, "choices") and action.dest == "verb"]
pages = [verb_parser.format_help() for verb_parser in verbs.choices.values()]
codes = [
    main(["chat", "--bogus-option"]),
    main(["chat", "--max-new-tokens=many"]),
    main(["train", "--max_stpes=3"]),
    main(["finetune", "--task", "sft", "--epoch=2"]),
    main(["recommend", "train", "--epoch=2"]),
    main(["quickstart", "--max-stpes=3"]),
    main(["explain", "--prompt", "hi", "--bogus"]),
    main(["quantize", "smollm2-135m-instruct", "--out", "x", "--bogus"]),
    main(["train-image", "--widht=8"]),
]
print(len(pages), codes, "torch" in sys.modules)
"""
    )
    assert result.stdout.split("\n")[0] == f"17 {[2] * 9} False", result.stderr
    errors = result.stderr.splitlines()
    assert errors[0].startswith("error: unknown config key 'bogus_option'")
    assert errors[1] == "error: max_new_tokens: expected an integer, got 'many'"
    assert "did you mean 'max_steps'" in errors[2] and "did you mean 'epochs'" in errors[3] + errors[4]
    assert "did you mean 'max_steps'" in errors[5]
    assert errors[6:8] == [
        "error: unexpected arguments ['--bogus']; see lmforge explain --help",
        "error: unexpected arguments ['--bogus']; see lmforge quantize --help",
    ]
    assert "did you mean 'width'" in errors[8]


def test_progress_bars_draw_fits_bar_for_each_stage_on_stderr(capsys):
    progress = progress_bars()
    for done in range(4):
        progress("scoring", done, 3)
    progress("writing", 0, 2)
    progress("writing", 2, 2)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and lines[0] == "scoring" and lines[1].startswith("3/3 ━")
    assert lines[2] == "writing" and lines[3].startswith("2/2 ━") and len(lines) == 4


@pytest.mark.parametrize("verb", ["chat", "generate"])
def test_decoding_verbs_take_threads_and_check_lmforge_threads_before_loading(verb, monkeypatch, capsys):
    assert "--threads" in help_of(verb, capsys)
    monkeypatch.setenv("LMFORGE_THREADS", "lots")
    assert main([verb, "--model", "no-such-model-file.gguf"]) == 2
    assert "LMFORGE_THREADS must be a whole number" in capsys.readouterr().err  # not the missing model


def test_generate_json_schema_file_errors_name_the_file_before_a_model_loads(tmp_path, capsys):
    broken, unusable = tmp_path / "broken.json", tmp_path / "unusable.json"
    broken.write_text("{nope", encoding="utf-8")
    unusable.write_text('{"type": "objekt"}', encoding="utf-8")
    for path, words in [
        (tmp_path / "missing.json", "no such file"),
        (broken, "not a readable JSON file"),
        (unusable, "json_schema: llguidance cannot use it"),
    ]:
        assert main(["generate", "--model", "no-such-model-file.gguf", "--json-schema", str(path)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: --json-schema {path}: {words}") and "no-such-model" not in error


def test_generate_json_schema_prints_json_that_validates(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    skip_without_smollm2()
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 50_000_000},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    prompt = "The largest city of France, as JSON: "
    arguments = ["--json-schema", str(path), "--prompt", prompt, "--temperature=0", "--max_new_tokens=60"]
    assert main(["generate", "--model", "smollm2-135m-instruct", *arguments]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out[len(prompt) :]), schema)
