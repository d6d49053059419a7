"""The lm-evaluation-harness adapter's chat templates (`--apply_chat_template`); its scoring is tested in
test_evaluate.py, and lm_eval's `local-completions` against a live server in tests/serve/test_scores.py."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.evaluation.evaluate import continuation_log_likelihood
from lmforge.inference.chat import encode_chat, render_chat
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import CharTokenizer

CAPITALS = Path(__file__).parents[2] / "examples" / "tasks" / "capitals.jsonl"

# A template of its own (not lmforge's ChatML fallback), so a rendering shows whose template made it.
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}: {{ message['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


def capitals_task_folder(folder: Path) -> Path:
    """lm_eval's task files for the shipped capitals quiz (20 questions, 4 choices): a YAML task over a local
    JSONL, so nothing comes from the hub. `--include_path` takes the folder; the task is `capitals_local`."""
    (folder / "capitals.jsonl").write_text(CAPITALS.read_text())
    (folder / "capitals.yaml").write_text(
        "task: capitals_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'capitals.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from lmforge.evaluation.lm_eval_adapter import LmforgeLM
    from lmforge.formats.checkpoint import save_model

    folder = tmp_path_factory.mktemp("templated")
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :?\n")
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layers=1, n_heads=2, d_model=16)
    save_model(folder / "model", Transformer(config), tokenizer)
    return LmforgeLM(str(folder / "model"))


def test_apply_chat_template_renders_with_the_models_template(adapter):
    history = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]
    assert adapter.chat_template() == TEMPLATE
    assert (
        adapter.apply_chat_template(history[:1])
        == "<|im_start|>user: Capital of Peru?<|im_end|><|im_start|>assistant: "
    )
    assert adapter.apply_chat_template(history) == render_chat(history, TEMPLATE)
    # lm_eval's assistant prefill: the last message stays open for the continuation
    assert adapter.apply_chat_template(history, add_generation_prompt=False).endswith("assistant: Lima")
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="one chat template"):
        adapter.chat_template("tool_use")


def test_a_chat_templated_task_scores_with_the_markup_as_special_tokens(adapter, tmp_path, monkeypatch):
    """lm_eval's `apply_chat_template=True` through the adapter: each question goes to the model as the template's
    user turn, its markup tokenized as the special tokens `encode_chat` gives (not as their characters)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(capitals_task_folder(tmp_path)))
    results = lm_eval.simple_evaluate(
        model=adapter, tasks=["capitals_local"], task_manager=manager, limit=3, apply_chat_template=True,
        log_samples=True,
    )  # fmt: skip
    model, tokenizer = adapter.model, adapter.tokenizer
    with torch.no_grad():  # as the adapter scores
        for sample in results["samples"]["capitals_local"]:
            question = json.loads(CAPITALS.read_text().splitlines()[sample["doc_id"]])
            context, _ = sample["arguments"][0]
            assert context == render_chat([{"role": "user", "content": question["context"]}], TEMPLATE)
            prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": question["context"]}])
            assert tokenizer.encode_with_special_tokens(context) == prompt_ids
            for (choice_context, choice), response in zip(sample["arguments"], sample["resps"]):
                expected = continuation_log_likelihood(model, tokenizer, choice_context, choice, special_tokens=True)[0]
                assert response[0][0] == pytest.approx(expected)
            as_text = continuation_log_likelihood(model, tokenizer, context, sample["arguments"][0][1])[0]
            assert sample["resps"][0][0][0] != pytest.approx(as_text)  # markup as characters would score otherwise
