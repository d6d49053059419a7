"""Sequence classification: pooling, padding invariance, `lmforge finetune --task classify` end to end."""

import json
import random

import pytest
import torch

from lmforge.apps.encoder import load_encoder
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.finetune.classify import (
    ClassifyConfig,
    SequenceClassifier,
    TextClassifier,
    WordVocabulary,
    finetune_classifier,
    tokenize_texts,
)
from lmforge.formats.checkpoint import save_model
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz !")


def tiny_decoder(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=64, n_layers=1, n_heads=2, d_model=32))


def sentiment_table(path, count=160, seed=0):
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(count):
        filler = " ".join("".join(rng.choices("xyzqw", k=3)) for _ in range(rng.randint(1, 3)))
        positive = rng.random() < 0.5
        lines.append(f"{filler} {'good' if positive else 'bad'},{'pos' if positive else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_last_token_pooling_ignores_right_padding():
    classifier = SequenceClassifier(tiny_decoder(), classes=3).eval()
    texts = ["abc", "a longer text here"]
    tokens, mask = tokenize_texts(TOKENIZER, texts, 64)
    batched = classifier(tokens, mask)
    for i, text in enumerate(texts):
        alone = classifier(*tokenize_texts(TOKENIZER, [text], 64))
        assert torch.allclose(batched[i], alone[0], atol=1e-5)
    hidden = classifier.backbone.hidden_states(tokens[:1, :3])
    assert torch.allclose(batched[0], classifier.head(hidden[0, -1]), atol=1e-5)


def test_mean_pooling_on_the_encoder_ignores_padding():
    encoder, tokenizer, _ = load_encoder("all-minilm-l6-v2")
    classifier = SequenceClassifier(encoder, classes=2, pooling="mean").eval()
    tokens, mask = tokenize_texts(tokenizer, ["short", "a much longer sentence than the first"], 32)
    batched = classifier(tokens, mask)
    alone = classifier(*tokenize_texts(tokenizer, ["short"], 32))
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_finetune_a_decoder_checkpoint_end_to_end(tmp_path):
    checkpoint = save_model(tmp_path / "base", tiny_decoder(), TOKENIZER)
    data = sentiment_table(tmp_path / "train.csv")
    out = tmp_path / "classifier"
    config = ClassifyConfig(
        data=str(data), model=str(checkpoint), out=str(out), epochs=12, batch_size=16, learning_rate=3e-3,
        warmup_steps=0, patience=20, validation_split=0.25,
    )  # fmt: skip
    result = finetune_classifier(config, verbose=0)
    assert result["accuracy"] > 0.9 and result["macro_f1"] > 0.9
    assert result["label_names"] == ["neg", "pos"] and result["validation_examples"] == 40
    assert sum(map(sum, result["confusion_matrix"])) == 40
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["config"]["epochs"] == 12
    classifier = TextClassifier(out)
    assert classifier.predict(["xyz good", "qqq bad"]) == ["pos", "neg"]
    assert torch.allclose(classifier.probabilities(["xyz good"]).sum(-1), torch.ones(1))

    # Why: the attributions of `lmforge explain --classifier` single out the sentiment word.
    assert main(["explain", "--classifier", str(out), "--prompt", "xyz good", "--out", str(tmp_path / "why")]) == 0
    why = json.loads((tmp_path / "why" / "explain.json").read_text())
    assert why["label"] == "pos" and why["tokens"] == list("xyz good")
    strongest = max(range(8), key=lambda i: abs(why["attributions"][i]))
    assert strongest >= 4, why["attributions"]  # one of "good", not of the filler "xyz "
    assert "rgba(" in (tmp_path / "why" / "explain.html").read_text()


def test_finetune_the_pretrained_encoder_with_lora_from_the_cli(tmp_path, capsys):
    rows = [{"text": f"{w} movie, truly {w}", "label": label} for w, label in [("wonderful", 1), ("awful", 0)] * 12]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "minilm"
    code = main(
        ["finetune", "--task", "classify", "--data", str(data), "--out", str(out), "--epochs=2", "--lora_rank=4"]
        + ["--learning_rate=1e-3", "--batch_size=8", "--validation_split=0.25"]
    )
    assert code == 0 and "validation accuracy" in capsys.readouterr().out
    classifier = TextClassifier(out)
    assert classifier.label_names == ["0", "1"]
    assert not any("lora" in name for name, _ in classifier.model.named_parameters())  # merged before saving


def test_missing_data_and_bad_labels_are_named(tmp_path):
    with pytest.raises(LmforgeError, match="classification needs data"):
        finetune_classifier(ClassifyConfig(), verbose=0)
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(LmforgeError, match="at least 2 classes"):
        finetune_classifier(ClassifyConfig(data=str(one_class), model="unused"), verbose=0)


def test_a_used_out_folder_is_refused_unless_overwrite(tmp_path):
    data = sentiment_table(tmp_path / "train.csv")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    config = ClassifyConfig(data=str(data), model="never loaded", out=str(tmp_path / "out"))
    with pytest.raises(LmforgeError, match=r"already holds a run \(metrics.json\); choose a new --out.*--overwrite"):
        finetune_classifier(config, verbose=0)


def test_word_vocabulary_keeps_the_most_frequent_words():
    vocabulary = WordVocabulary(["the cat", "the dog", "the cat sat"], size=4)  # 0 pad, 1 unknown, 2 words
    assert vocabulary.index == {"the": 2, "cat": 3}
    assert vocabulary.encode(["The cat flew away", "cat"], 3).tolist() == [[2, 3, 1], [3, 0, 0]]


def test_classify_under_torchrun_on_two_processes_writes_one_classifier(tmp_path):
    """Two gloo processes share each batch; one writes the best-epoch weights (the other reads them after a
    barrier) and the classifier. Not compared number for number: the head's dropout draws per process."""
    import os
    import subprocess
    import sys

    checkpoint = save_model(tmp_path / "base", tiny_decoder(), TOKENIZER)
    data = sentiment_table(tmp_path / "train.csv")
    out = tmp_path / "classifier"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge",
               "finetune", "--task", "classify", "--data", str(data), "--model", str(checkpoint), "--out", str(out),
               "--epochs=12", "--batch_size=16", "--learning_rate=3e-3", "--warmup_steps=0", "--patience=20",
               "--validation_split=0.25"]  # fmt: skip
    run = subprocess.run(
        command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9 and len(metrics["history"]["loss"]) == 12
    assert not (out / "best.safetensors").exists() and not (out / "training_state.pt").exists()
    assert TextClassifier(out).predict(["xyz good", "qqq bad"]) == ["pos", "neg"]


def test_classify_sharded_over_two_processes_writes_what_one_process_writes(tmp_path):
    """--parallel fsdp --activation-checkpointing with LoRA on 2 gloo processes against one (in this
    process; dropout off, as each process draws its own): the same history and the same classifier, the
    best epoch's (not the last: its validation loss rose), read back from the shards and merged."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    checkpoint = save_model(tmp_path / "base", tiny_decoder(), TOKENIZER)
    data = sentiment_table(tmp_path / "train.csv", count=30)
    # Labels the other way round: the more the model learns, the higher the validation loss.
    swapped = sentiment_table(tmp_path / "swapped.csv", count=8, seed=1).read_text().replace(",pos", ",p")
    (tmp_path / "swapped.csv").write_text(swapped.replace(",neg", ",pos").replace(",p\n", ",neg\n"))
    settings = dict(epochs=3, batch_size=8, learning_rate=3e-3, warmup_steps=0, patience=20,
                    validation=str(tmp_path / "swapped.csv"), dropout=0.0, lora_rank=4, lora_dropout=0.0,
                    checkpoint_interval=1)  # fmt: skip
    one = finetune_classifier(
        ClassifyConfig(data=str(data), model=str(checkpoint), out=str(tmp_path / "one"), parallel="fsdp", **settings),
        verbose=0,
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge",
               "finetune", "--task", "classify", "--data", str(data), "--model", str(checkpoint),
               "--out", str(tmp_path / "two"), "--parallel", "fsdp", "--activation-checkpointing",
               *(f"--{key}={value}" for key, value in settings.items())]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fsdp over 2 processes" in run.stdout
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    validation_losses = one["history"]["val_loss"]
    assert validation_losses == sorted(validation_losses)  # the best epoch is the first, not the last
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert two["history"][key] == pytest.approx(one["history"][key], abs=1e-5), key
    assert (two["accuracy"], two["confusion_matrix"]) == (one["accuracy"], one["confusion_matrix"])
    one_weights, two_weights = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert one_weights.keys() == two_weights.keys() and not any("lora" in name for name in one_weights)
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(
        ["classifier.json", "model.safetensors", "tokenizer.json", "metrics.json", "confusion_matrix.png"]
    )
    assert TextClassifier(tmp_path / "two").predict(["xyz good"]) == TextClassifier(tmp_path / "one").predict(
        ["xyz good"]
    )
