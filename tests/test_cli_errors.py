"""Every verb, given arguments a user can get wrong, ends as one `error: ...` line and exit 2, never a traceback."""

import argparse
import socket

import pytest
import torch

from lmforge.cli import build_parser, main
from lmforge.formats.checkpoint import save_model
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """{name: path}: a tiny model folder, a folder that is not a model, a plain file, a short text, a missing path."""
    root = tmp_path_factory.mktemp("bad_arguments")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=32, d_mlp=64)
    save_model(root / "model", Transformer(config), TOKENIZER)
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("just notes\n")
    (root / "a_file").write_text("a file where a folder is needed\n")
    (root / "short.txt").write_text("a")
    (root / "bad.yaml").write_text("learning_rat: 0.1\n")
    (root / "broken.yaml").write_text("learning_rate: [0.1\n")
    names = ("model", "not_a_model", "a_file", "missing")
    return {name: str(root / name) for name in names} | {
        "short_text": str(root / "short.txt"),
        "bad_yaml": str(root / "bad.yaml"),
        "broken_yaml": str(root / "broken.yaml"),
        "root": str(root),
    }


# (verb and arguments with {place} fields, the reason it is wrong). Each runs in-process: a traceback would
# be an exception escaping `main`, which fails the test with the traceback shown.
BAD_ARGUMENTS = [
    ("prepare {missing} --out {root}/prepared", "a missing input file"),
    ("prepare {not_a_model}/notes.txt --out {a_file}", "--out taken by a file"),
    ("prepare {not_a_model}/notes.txt --out {root}/p2 --val-fraction lots", "a bad value"),
    ("prepare {not_a_model}/notes.txt --out {root}/p3 --tokenizer {missing}.json", "a missing tokenizer file"),
    ("prepare --recipe gutenberg --out {root}/p4", "an unknown recipe"),
    ("train --config {missing}.yaml", "a missing config file"),
    ("train --config {bad_yaml}", "a bad key in a config file"),
    ("train --config {broken_yaml}", "a config file that is not YAML"),
    ("train --config {a_file}", "a config file that is not JSON"),
    ("train --learning-rat=0.1", "a bad config key"),
    ("train --data-dir={not_a_model}", "a folder that is not prepared data"),
    ("train --batch-size=many", "a bad value"),
    ("generate --model {missing}", "a missing model"),
    ("generate --model {not_a_model}", "a folder that is not a model"),
    ("generate --model {model} --temperature=hot", "a bad value"),
    ("generate --model {model} --tempreature=0", "a bad config key"),
    ("generate --model {model} --top-p=2", "a value out of its range"),
    ("generate --model {model} --max-new-tokens=-1", "a value out of its range"),
    ("chat --model {model} --temperature=-0.5", "a value out of its range"),
    ("chat --model {model} --device tpu", "a bad device"),
    (
        "chat --model {model} --device cuda:0"
        if not torch.cuda.is_available()
        else "chat --model {model} --device gpu",
        "a device this machine lacks",
    ),
    ("generate --model {model} --draft {not_a_model}", "a draft that is not a model"),
    ("generate --model {model} --device tpu", "a bad device"),
    (
        "eval --model {model} --text {short_text} --device cuda:0"
        if not torch.cuda.is_available()
        else "eval --model {model} --text {short_text} --device gpu",
        "a device this machine lacks",
    ),
    ("eval --model {not_a_model} --text {short_text}", "a folder that is not a model"),
    ("eval --model {model} --text {missing}", "a missing text file"),
    ("eval --model {model} --task {missing}.jsonl", "a missing task file"),
    ("eval --model {model} --data-dir {not_a_model}", "a folder that is not prepared data"),
    ("eval --compare {missing}", "a missing result"),
    ("eval --model {model} --text {short_text} --split test", "a bad value"),
    ("chat {not_a_model}", "a folder that is not a model"),
    ("chat --model {missing}", "a missing model"),
    ("chat --model {model} --top-q=1", "a bad config key"),
    ("chat --model {model} --config {missing}.yaml", "a missing config file"),
    ("export --model {not_a_model} --format hf --out {root}/hf", "a folder that is not a model"),
    ("export --model {model} --format hf --out {a_file}", "--out taken by a file"),
    ("export --model {model} --format gguf --out {a_file}/m.gguf", "--out under a file"),
    ("export --model {model} --format onnx --out {root}/x", "a bad value"),
    ("finetune --task sft --data={missing}.jsonl --model={model} --out={root}/sft", "a missing input file"),
    ("finetune --task classify --data={missing}.csv --model={model} --out={root}/cls", "a missing input file"),
    ("finetune --task sft --epoch=2", "a bad config key"),
    ("finetune --task translate", "a bad value"),
    (
        "finetune --task sft --data={not_a_model}/notes.txt --model={model} --out={root}/sft2 --device=gpu",
        "a bad device",
    ),
    ("explain --model {not_a_model} --prompt hi", "a folder that is not a model"),
    ("explain --classifier {not_a_model} --prompt hi", "a folder that is not a classifier"),
    ("explain --model {model} --prompt hi --out {a_file} --method gradient_x_input", "--out taken by a file"),
    ("explain --model {model} --prompt hi --top-k=few", "a bad value"),
    ("explain --model {model} --prompt hi --top-k 0", "a bad value"),
    ("explain --model {model} --prompt=", "an empty prompt"),
    ("train-image --epoch=2", "a bad config key"),
    ("train-image --model vae", "a bad value"),
    ("train-image --data {not_a_model} --out {root}/img", "a folder of images without captions"),
    ("train-image --data {not_a_model} --captions {missing}.jsonl --out {root}/img", "a missing captions file"),
    ("train-image --data {missing} --captions {a_file} --out {root}/img", "a missing image folder"),
    ("train-image --data {not_a_model} --captions {a_file} --out {root}/img", "a captions file that is not JSON"),
    ("train-image --resume --out {root}/never_trained", "nothing to resume"),
    ("train-image --model gan --image-size=12 --out {root}/gan", "a bad value"),
    ("imagine seven --model {missing}", "a missing image model"),
    ("imagine seven --model {model}", "a folder that is not an image model"),
    ("imagine seven --n 0", "a bad count"),
    ("imagine seven --steps many", "a bad value"),
    ("recommend train --data={missing}.csv --out={root}/rec", "a missing input file"),
    ("recommend train --epoch=2", "a bad config key"),
    ("recommend eval {not_a_model}", "a folder that is not a recommender"),
    ("recommend top {missing} --history 1,2", "a missing recommender"),
    ("recommend dance {root}", "a bad value"),
    ("serve {not_a_model}", "a folder that is not a model"),
    ("serve --model {missing}", "a missing model"),
    ("serve --model {model} --port=eighty", "a bad value"),
    ("serve --model {model} --max-bach=4", "a bad config key"),
    ("serve --model {model} --port=-5", "a port out of range"),
    ("serve --model {model} --host=999.1.1.1", "a host that does not resolve"),
    ("embed --model {not_a_model} hello", "a folder that is not a model"),
    ("embed --model {missing} hello", "a missing model"),
    ("search {missing} hello", "a missing folder"),
    ("search {not_a_model} hello --model {not_a_model}", "a folder that is not a model"),
    ("search {not_a_model} hello -k many", "a bad value"),
    ("quantize {missing} --out {root}/q", "a missing model"),
    ("quantize {not_a_model} --out {root}/q", "a folder that is not a model"),
    ("quantize {model} --out {root}/q --bits 3", "a bad value"),
    ("quantize {model} --out {root}/q --group-size 48", "a bad value"),
    ("quantize {model} --out {root}/q --eval-text {missing}.txt", "a missing text file"),
    ("quantize {model} --out {root}/q --eval-text {short_text}", "a text too short to score"),
    ("quantize {model} --out {a_file} --eval-text {short_text}", "--out taken by a file"),
    ("quantize {model} --out {root}/q --eval-tokens 0", "a bad value"),
    ("models --bogus", "an unknown option"),
    ("models extra", "an unexpected argument"),
    ("quickstart --max-stpes=3", "a bad config key"),
    ("quickstart --minutes soon", "a bad value"),
    ("quickstart --minutes -1", "a bad value"),
    ("quickstart --out-dir {a_file}", "--out-dir taken by a file"),
]


def test_the_walk_covers_every_verb():
    (verbs,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    assert {arguments.split()[0] for arguments, _ in BAD_ARGUMENTS} == set(verbs.choices)


@pytest.mark.parametrize("arguments, mistake", BAD_ARGUMENTS, ids=[arguments for arguments, _ in BAD_ARGUMENTS])
def test_a_user_mistake_is_one_error_line_and_exit_2(arguments, mistake, places, capsys, monkeypatch):
    monkeypatch.chdir(places["root"])  # a verb's default output folder lands in the test's folder
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # chat must not wait for input
    try:
        code = main(arguments.format(**places).split())
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, f"{mistake}: exit {code}\n{err}"
    lines = err.splitlines()
    # Only what a verb said it was doing ("loading MODEL ...") may come before the error.
    assert lines and lines[-1].startswith("error: "), f"{mistake}: {err}"
    assert "Traceback" not in err and not any(line.startswith("error: ") for line in lines[:-1])


def test_serve_says_the_port_is_taken_before_loading_the_model(places, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", places["missing"], f"--port={port}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port} (Address already in use")


def test_an_unknown_verb_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian", "--max-steps=3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument VERB: invalid choice: 'trian'")
