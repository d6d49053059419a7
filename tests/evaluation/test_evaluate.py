import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.evaluation.evaluate import (
    evaluate_loss,
    fewshot_prefix,
    read_task,
    run_task,
    score_generation,
    text_perplexity,
    token_log_probabilities,
)
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import CharTokenizer
from lmforge.training.data import TokenDataset


def test_uniform_model_has_closed_form_perplexity_and_bpb(char_dataset):
    dataset = TokenDataset(char_dataset, "val")
    tokenizer = dataset.tokenizer()
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layers=1, n_heads=2, d_model=16))
    torch.nn.init.zeros_(model.lm_head.weight)  # zero logits: every token has probability 1/V
    result = evaluate_loss(model, dataset, tokenizer.token_byte_lengths(), block_size=16)
    vocab = tokenizer.vocab_size
    assert abs(result["loss"] - math.log(vocab)) < 1e-5
    assert abs(result["perplexity"] - vocab) < 1e-2
    # Char tokens of ASCII text are one byte each, except end-of-text separators (zero bytes).
    windows = list(dataset.iterate(16, 8))
    targets = torch.cat([t for _, t in windows]).flatten()
    text_tokens = int((targets != tokenizer.eos_id).sum())
    assert result["bits_per_byte"] == pytest.approx(math.log2(vocab) * len(targets) / text_tokens, rel=1e-6)


def test_evaluation_respects_max_tokens_and_restores_mode(char_dataset):
    dataset = TokenDataset(char_dataset, "val")
    model = Transformer(
        ModelConfig(vocab_size=dataset.tokenizer().vocab_size, block_size=16, n_layers=1, n_heads=2, d_model=16)
    )
    model.train()
    result = evaluate_loss(model, dataset, block_size=16, max_tokens=64)
    assert result["tokens"] == 64 and model.training


# --- text perplexity, tasks, reports, lm-evaluation-harness -------------------------------

TOKENIZER = CharTokenizer("ab\n")


def constant_model(probabilities: dict[str, float]) -> Transformer:
    """A model whose next-token distribution ignores the input: known log-likelihoods in closed form."""
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16, bias=True)
    model = Transformer(config).eval()
    log_p = torch.full((TOKENIZER.vocab_size,), -30.0)
    for char, p in probabilities.items():
        log_p[TOKENIZER.encode(char)[0]] = math.log(p)
    with torch.no_grad():
        model.final_norm.weight.zero_()  # the final hidden state is the norm's bias: e_0, at every position
        model.final_norm.bias.zero_()
        model.final_norm.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = log_p  # logits = log p (+ a constant the softmax removes)
    return model


def test_text_perplexity_is_the_closed_form_at_any_window():
    probabilities = {"a": 0.6, "b": 0.3, "\n": 0.1}
    model = constant_model(probabilities)
    text = "abba\naab" * 9  # 72 characters: longer than the 32-token context
    expected_nats = -sum(math.log(probabilities[c]) for c in text)
    for window, stride in ((32, 16), (32, 32), (8, 3)):
        result = text_perplexity(model, TOKENIZER, text, window=window, stride=stride)
        assert result["tokens"] == len(text)  # every character scored once (the separator in front is context)
        assert result["loss"] == pytest.approx(expected_nats / len(text), rel=1e-4)
        assert result["bits_per_byte"] == pytest.approx(expected_nats / math.log(2) / len(text), rel=1e-4)


def test_sliding_window_scores_each_token_with_its_window_context():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layers=2, n_heads=2, d_model=16))
    tokens = torch.randint(0, TOKENIZER.vocab_size, (20,)).tolist()
    whole = token_log_probabilities(model.eval(), tokens)
    with torch.no_grad():
        reference = F.log_softmax(model(torch.tensor([tokens]))[0][0], -1)
    assert torch.allclose(whole, reference[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0], atol=1e-5)
    windowed = token_log_probabilities(model, tokens, window=8, stride=4)
    assert windowed.shape == whole.shape and torch.allclose(windowed[:7], whole[:7], atol=1e-5)


def test_multiple_choice_sum_and_length_normalised_scores(tmp_path):
    model = constant_model({"a": 0.3, "b": 0.05, "\n": 0.65})
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "ab", "choices": ["aaa", "b"], "label": 0}) + "\n")
    result = run_task(model, TOKENIZER, task)
    # sum: 3 log 0.3 = -3.61 < log 0.05 = -3.00, so "b"; per byte: -1.20 > -3.00, so "aaa".
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0
    assert result["predictions"][0]["scores"] == pytest.approx([3 * math.log(0.3), math.log(0.05)], rel=1e-4)


def test_generative_exact_match_and_few_shot_prompts(tmp_path):
    model = constant_model({"a": 0.9, "b": 0.05, "\n": 0.05})
    task = tmp_path / "gen.jsonl"
    rows = [
        {"context": "b", "answer": "aaaa"},
        {"context": "bb", "answer": ["x", "aaaa"]},
        {"context": "a", "answer": "b"},
    ]
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = read_task(task)
    result = score_generation(model, TOKENIZER, examples, max_new_tokens=4)
    assert result["outputs"] == ["aaaa"] * 3 and result["exact_match"] == pytest.approx(2 / 3)
    prefix = fewshot_prefix(examples, 0, 2, seed=0)
    assert prefix in ("bbx\n\nab\n\n", "ab\n\nbbx\n\n") and fewshot_prefix(examples, 0, 2, 0) == prefix
    with pytest.raises(LmforgeError, match="3-shot needs 4 examples"):
        fewshot_prefix(examples, 0, 3, 0)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"choices": ["a", "b"], "label": 0}', "needs a string 'context'"),
        ('{"context": "x", "choices": ["a"], "label": 0}', "'choices' must be a list of at least 2"),
        ('{"context": "x", "choices": ["a", "b"], "label": 2}', "'label' must be an index"),
        ('{"context": "x"}', "needs 'choices' \\+ 'label' or 'answer'"),
    ],
)
def test_bad_task_files_name_the_line(tmp_path, line, message):
    task = tmp_path / "t.jsonl"
    task.write_text('{"context": "ok", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
    with pytest.raises(LmforgeError, match=f"t.jsonl:2: {message}"):
        read_task(task)


def test_eval_cli_writes_reports_and_compares_checkpoints(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.formats.checkpoint import save_model

    task = tmp_path / "mc.jsonl"
    task.write_text(
        "".join(json.dumps({"context": "a", "choices": ["a", "b"], "label": i % 2}) + "\n" for i in range(6))
    )
    text = tmp_path / "held_out.txt"
    text.write_text("abab\nbaba\n" * 5)
    for name, seed in (("one", 0), ("two", 1)):
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16)
        save_model(tmp_path / name, Transformer(config), TOKENIZER)
        args = ["eval", "--model", str(tmp_path / name), "--text", str(text), "--task", str(task)]
        assert main([*args, "--num-fewshot", "1", "--out", str(tmp_path / f"eval-{name}")]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "bits/byte" in printed and "acc_norm" in printed
    result = json.loads((tmp_path / "eval-one" / "result.json").read_text())
    assert set(result["metrics"]) == {"held_out", "mc"} and result["metrics"]["mc"]["shots"] == 1
    assert (tmp_path / "eval-one" / "report.md").read_text().count("|") > 10
    assert (tmp_path / "eval-one" / "accuracy.png").exists() and "<table>" in (
        tmp_path / "eval-one" / "report.html"
    ).read_text()
    assert main(["eval", "--compare", str(tmp_path / "eval-one"), str(tmp_path / "eval-two")]) == 0
    table = capsys.readouterr().out
    assert "held_out/perplexity" in table and str(tmp_path / "one") in table and str(tmp_path / "two") in table


@pytest.mark.slow
def test_lm_evaluation_harness_scores_like_lmforge(tmp_path, monkeypatch):
    """lm_eval's own pipeline (task YAML on a local JSONL) through the `lmforge` model type gives our
    accuracy, from Python and from its command line."""
    import subprocess
    import sys

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local JSON file; nothing may come from the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lmforge.evaluation.lm_eval_adapter import LmforgeLM
    from lmforge.formats.checkpoint import save_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16)
    save_model(tmp_path / "model", Transformer(config), TOKENIZER)
    rows = [{"context": "ab" * (i % 3 + 1), "choices": ["a", "bb", "ba"], "label": i % 3} for i in range(9)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "toy.yaml").write_text(
        "task: lmforge_toy\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'toy.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path))
    model = LmforgeLM(str(tmp_path / "model"))
    results = lm_eval.simple_evaluate(model=model, tasks=["lmforge_toy"], task_manager=manager)
    theirs = results["results"]["lmforge_toy"]["acc,none"]
    ours = run_task(model.model, model.tokenizer, tmp_path / "toy.jsonl")["acc"]
    assert theirs == pytest.approx(ours)

    # Rolling log-likelihood (perplexity tasks) = the summed log-probabilities of one plain forward.
    from types import SimpleNamespace

    text = "abba\nab"
    ids = torch.tensor([[TOKENIZER.document_start_id] + TOKENIZER.encode(text)])
    with torch.no_grad():
        log_probabilities = F.log_softmax(model.model(ids[:, :-1])[0][0], -1)
    expected = float(log_probabilities.gather(-1, ids[0, 1:, None]).sum())
    (rolling,) = model.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert rolling == pytest.approx(expected, rel=1e-5)

    command = [sys.executable, "-m", "lmforge.evaluation.lm_eval_adapter", "--model", "lmforge"]
    command += ["--model_args", f"pretrained={tmp_path / 'model'}", "--tasks", "lmforge_toy"]
    command += ["--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(written.read_text())["results"]["lmforge_toy"]["acc,none"] == pytest.approx(ours)


def test_the_shipped_example_task_is_well_formed():
    from pathlib import Path

    examples = read_task(Path(__file__).parents[2] / "examples" / "tasks" / "capitals.jsonl")
    assert len(examples) == 20 and all(len(e.choices) == 4 and e.choices[e.label].strip() for e in examples)
