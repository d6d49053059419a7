"""SFT: the loss mask covers exactly the assistant turns, packing keeps examples whole, LoRA-SFT end to end."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.finetune.lora import load_adapter
from lmforge.finetune.sft import (
    IGNORE,
    SFTConfig,
    finetune_chat,
    pack,
    read_conversations,
    tokenize_conversation,
    training_pair,
)
from lmforge.formats.checkpoint import load_model, save_model
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?!.<>|_\n")
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine."},
]


def assistant_text(tokenizer, ids, is_assistant):
    return tokenizer.decode([token for token, scored in zip(ids, is_assistant) if scored])


def test_mask_covers_exactly_the_assistant_turns_and_their_end_markers():
    ids, is_assistant = tokenize_conversation(TOKENIZER, CONVERSATION)
    assert TOKENIZER.decode(ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "hello!<|im_end|>\n<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\nfine.<|im_end|>\n"
    )
    assert assistant_text(TOKENIZER, ids, is_assistant) == "hello!<|im_end|>\nfine.<|im_end|>\n"
    inputs, targets = training_pair(ids, is_assistant)
    assert len(inputs) == len(targets) == len(ids) - 1
    scored = [target for target in targets if target != IGNORE]
    assert TOKENIZER.decode(scored) == "hello!<|im_end|>\nfine.<|im_end|>\n"
    # Every scored target is the token right after its input position.
    assert all(t == ids[i + 1] for i, t in enumerate(targets) if t != IGNORE)


def test_mask_with_smollm2s_own_template_and_tokenizer():
    from lmforge.formats.loading import load

    _, tokenizer = load("smollm2-135m-instruct")
    ids, is_assistant = tokenize_conversation(tokenizer, CONVERSATION[1:])
    assert assistant_text(tokenizer, ids, is_assistant) == "hello!<|im_end|>\nfine.<|im_end|>\n"
    # The template's default system prompt is part of the rendered text but never scored.
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids)


def test_packing_fills_rows_with_whole_examples():
    pairs = [([1, 2, 3], [2, 3, IGNORE]), ([4, 5], [5, 6]), ([7, 8, 9, 10], [8, 9, 10, 11]), ([11] * 9, [12] * 9)]
    inputs, targets, documents, truncated = pack(pairs, length=6, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4, 5, 0], [7, 8, 9, 10, 0, 0], [11] * 6]
    assert targets.tolist() == [[2, 3, IGNORE, 5, 6, IGNORE], [8, 9, 10, 11, IGNORE, IGNORE], [12] * 6]
    assert documents.tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [1] * 6]
    assert truncated == 1
    unpacked, _, _, _ = pack(pairs[:3], length=6, pad_id=0, packing=False)
    assert unpacked.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [7, 8, 9, 10]]


def test_a_packed_example_gives_the_same_logits_as_alone():
    model = Transformer(
        ModelConfig(
            vocab_size=40,
            block_size=16,
            n_layers=2,
            n_heads=2,
            d_model=16,
            **LLAMA_SWITCHES,
        )  # fmt: skip
    ).eval()
    first, second = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11]])
    inputs, _, documents, _ = pack([(first[0].tolist(), [0] * 3), (second[0].tolist(), [0] * 4)], 8, pad_id=0)
    with torch.no_grad():
        packed = model(inputs, document_ids=documents)[0]
        assert torch.allclose(packed[0, :3], model(first)[0][0], atol=1e-5)
        assert torch.allclose(packed[0, 3:7], model(second)[0][0], atol=1e-5)  # as if at position 0, alone


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "hi"}', "needs a non-empty 'messages' list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0 needs a role"),
        ('{"messages": [{"role": "user", "content": 3}]}', "message 0 needs string 'content'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ],
)
def test_bad_chat_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + line + "\n")
    with pytest.raises(LmforgeError, match=f"chats.jsonl:2: {message}"):
        read_conversations(path)


def chat_file(path, count=24):
    lines = []
    for i in range(count):
        word = "abcdefgh"[i % 8] * 3
        lines.append({"messages": [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": word}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tiny_checkpoint(folder):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=TOKENIZER.vocab_size,
            block_size=256,
            n_layers=2,
            n_heads=2,
            d_model=32,
            **LLAMA_SWITCHES,
        )  # fmt: skip
    )
    return save_model(folder, model, TOKENIZER)


def test_lora_sft_learns_and_the_adapter_reloads_onto_the_base(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    data = chat_file(tmp_path / "chats.jsonl")
    config = SFTConfig(
        data=str(data), model=str(base), out=str(tmp_path / "out"), max_tokens=256, epochs=4, batch_size=2,
        learning_rate=1e-2, lora_rank=8, merge=True,
    )  # fmt: skip
    result = finetune_chat(config, verbose=0)
    # A random base's frozen head barely lets rank-8 adapters move the loss; full fine-tuning is tested below.
    losses = result["history"]["loss"]
    assert losses[-1] < losses[0] - 0.05
    # 31 tokens each (ChatML's markers are one special token apiece), 8 to a row of 256
    assert result["conversations"] == 24 and result["rows"] == 3
    assert set(result["written"]) == {"adapter", "model"}

    merged, _, _ = load_model(tmp_path / "out" / "model")
    adapted = load_adapter(load_model(base)[0], tmp_path / "out" / "adapter")
    tokens = torch.tensor([TOKENIZER.encode("<|im_start|>user\nsay ccc<|im_end|>\n<|im_start|>assistant\n")])
    assert torch.allclose(merged(tokens)[0], adapted(tokens)[0], atol=1e-4)
    assert not torch.allclose(load_model(base)[0](tokens)[0], merged(tokens)[0], atol=1e-3)


def test_full_sft_from_the_cli_writes_a_loadable_model(tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base")
    data = chat_file(tmp_path / "chats.jsonl", 8)
    args = ["finetune", "--task", "sft", "--data", str(data), "--model", str(base), "--out", str(tmp_path / "full")]
    # 16 steps at 1e-2 from a random model: 5 warmup steps (not the default 1) keep the loss from overshooting.
    settings = ["--lora_rank=0", "--epochs=4", "--packing=false", "--learning_rate=1e-2", "--batch_size=2"]
    assert main([*args, *settings, "--warmup_steps=5"]) == 0
    assert "wrote model" in capsys.readouterr().out
    model, tokenizer, config = load_model(tmp_path / "full" / "model")
    assert config["base_model"] == str(base) and tokenizer.vocab_size == TOKENIZER.vocab_size
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["rows"] == 8 and metrics["config"]["packing"] is False
    assert metrics["history"]["loss"][-1] < 0.5 * metrics["history"]["loss"][0]


def test_generate_and_load_apply_an_adapter(tmp_path):
    from lmforge.formats.loading import load

    base = tiny_checkpoint(tmp_path / "base")
    config = SFTConfig(data=str(chat_file(tmp_path / "c.jsonl", 4)), model=str(base), out=str(tmp_path / "out"))
    config.epochs, config.learning_rate = 1, 5e-2
    finetune_chat(config, verbose=0)
    adapted, _ = load(base, adapter=tmp_path / "out" / "adapter")
    assert not any("lora" in name for name, _ in adapted.named_parameters())  # fp32 base: merged in
    reference = load_adapter(load_model(base)[0], tmp_path / "out" / "adapter")
    tokens = torch.tensor([TOKENIZER.encode("say aaa")])
    assert torch.allclose(adapted(tokens)[0], reference(tokens)[0], atol=1e-4)


def test_a_five_chat_one_epoch_run_trains_at_the_peak_learning_rate(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    config = SFTConfig(data=str(chat_file(tmp_path / "c.jsonl", 5)), model=str(base), out=str(tmp_path / "out"))
    config.epochs = 1
    result = finetune_chat(config, verbose=0)
    # The five chats pack into one row: one optimizer step, taken at 2e-4 (a fixed 5-step warmup made it 4e-5).
    assert result["rows"] == 1 and result["warmup_steps"] == 0 and result["reached_peak_learning_rate"]
    assert result["history"]["learning_rate"] == pytest.approx([config.learning_rate])


def test_a_used_out_folder_is_refused_unless_overwrite(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    out = tmp_path / "out"
    config = SFTConfig(data=str(chat_file(tmp_path / "c.jsonl", 4)), model=str(base), out=str(out), epochs=1)
    finetune_chat(config, verbose=0)
    with pytest.raises(LmforgeError, match=r"already holds a run \(adapter, metrics.json\).*--overwrite"):
        finetune_chat(config, verbose=0)
    config.lora_rank, config.overwrite = 0, True  # full fine-tuning: no adapter of the old run may stay beside it
    result = finetune_chat(config, verbose=0)
    assert set(result["written"]) == {"model"} and not (out / "adapter").exists()
    (archive,) = out.glob("previous-*")
    assert sorted(p.name for p in archive.iterdir()) == ["adapter", "metrics.json"]
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["written"] == result["written"] and "overwrite" not in recorded["config"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # fsdp alone: the training state is a folder of shards
def test_an_interrupted_sft_run_resumes_to_the_same_adapter(tmp_path, monkeypatch, parallel):
    """Ctrl-C in the second epoch saves the training state; --resume=true ends with the weights of a run
    that was never stopped (LoRA with dropout, so the RNG state counts too)."""
    from lmforge.training import fit as fit_module

    base = tiny_checkpoint(tmp_path / "base")
    data = chat_file(tmp_path / "chats.jsonl", 8)

    def config(out: str, **changes) -> SFTConfig:
        changes = {"parallel": parallel} | changes
        return SFTConfig(data=str(data), model=str(base), out=str(tmp_path / out), max_tokens=64, epochs=2,
                         batch_size=2, learning_rate=1e-2, lora_rank=4, lora_dropout=0.1, packing=False,
                         **changes)  # fmt: skip

    straight = finetune_chat(config("straight"), verbose=0)
    forward_backward = fit_module.forward_backward
    calls = {"count": 0}

    def interrupted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 7:  # in the second epoch's third batch (4 batches an epoch), mid-step
            raise KeyboardInterrupt
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(fit_module, "forward_backward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune_chat(config("stopped"), verbose=0)
    monkeypatch.setattr(fit_module, "forward_backward", forward_backward)
    state_path = tmp_path / "stopped" / ("training_state.pt" if parallel == "ddp" else "training_state/state.pt")
    state = torch.load(state_path, weights_only=True)
    assert (state["position"]["epoch"], state["position"]["batches_done"]) == (1, 2)  # saved by the Ctrl-C
    with pytest.raises(LmforgeError, match="already holds a run.*--resume=true"):
        finetune_chat(config("stopped"), verbose=0)
    other, written_by = ("fsdp", "ddp") if parallel == "ddp" else ("ddp", "fsdp or hsdp")
    with pytest.raises(LmforgeError, match=f"by a parallel={written_by} run; resume it with --parallel {written_by}"):
        finetune_chat(config("stopped", resume=True, parallel=other), verbose=0)
    resumed = finetune_chat(config("stopped", resume=True), verbose=0)
    assert resumed["history"] == straight["history"]
    straight_adapter = load_adapter(load_model(base)[0], tmp_path / "straight" / "adapter")
    resumed_adapter = load_adapter(load_model(base)[0], tmp_path / "stopped" / "adapter")
    for a, b in zip(straight_adapter.state_dict().values(), resumed_adapter.state_dict().values()):
        assert torch.equal(a, b)
    assert not any((tmp_path / "stopped").glob("training_state*"))  # complete: nothing left to resume


def test_sft_under_torchrun_on_two_processes_trains_as_one_process(tmp_path):
    """9 chats in batches of 4 (4, 4, 1: the last leaves the second process nothing), two batches a step:
    the same losses and adapter from 2 gloo processes as from one (dropout off: each process draws its own)."""
    import os
    import subprocess
    import sys

    base = tiny_checkpoint(tmp_path / "base")
    data = chat_file(tmp_path / "chats.jsonl", 9)
    common = ["finetune", "--task", "sft", "--data", str(data), "--model", str(base), "--lora_rank=4",
              "--lora_dropout=0", "--epochs=2", "--batch_size=4", "--accumulation_steps=2", "--packing=false",
              "--learning_rate=1e-2", "--max_tokens=64"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "lmforge", *common, "--out", str(tmp_path / "one")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge"]
    two = subprocess.run(
        [*torchrun, *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_history = json.loads((tmp_path / "one" / "metrics.json").read_text())["history"]
    two_history = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    assert len(one_history["loss"]) == 2
    assert two_history["loss"] == pytest.approx(one_history["loss"], abs=1e-5)
    one = load_adapter(load_model(base)[0], tmp_path / "one" / "adapter").state_dict()
    two = load_adapter(load_model(base)[0], tmp_path / "two" / "adapter").state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-5)
    assert not any((tmp_path / "two").glob(".*.tmp"))  # one process wrote, no half-written leftovers


def test_lora_sft_sharded_over_two_processes_writes_what_one_process_writes(tmp_path):
    """--parallel fsdp --activation-checkpointing on 2 gloo processes against one (in this process): the
    same losses and accuracies, and the same adapter and merged model, each a whole folder (gathered from
    the shards); the sharded training state is gone once the run completes. The validation chats answer
    otherwise than the training chats, so their loss rises after epoch 1 and early stopping restores epoch
    1's weights, kept whole on process 0 and put back into both shards."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    base = tiny_checkpoint(tmp_path / "base")
    data = chat_file(tmp_path / "chats.jsonl", 9)
    swapped = [json.loads(line) for line in chat_file(tmp_path / "swapped.jsonl", 4).read_text().splitlines()]
    for chat in swapped:  # "say aaa" -> "bbb"
        chat["messages"][1]["content"] = chr(ord(chat["messages"][1]["content"][0]) + 1) * 3
    (tmp_path / "swapped.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in swapped))
    settings = dict(lora_rank=4, lora_dropout=0.0, merge=True, epochs=3, batch_size=4, accumulation_steps=2,
                    packing=False, learning_rate=3e-2, max_tokens=64, checkpoint_interval=1,
                    validation=str(tmp_path / "swapped.jsonl"))  # fmt: skip
    finetune_chat(SFTConfig(data=str(data), model=str(base), out=str(tmp_path / "one"), parallel="fsdp", **settings),
                  verbose=0)  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge",
               "finetune", "--task", "sft", "--data", str(data), "--model", str(base), "--out", str(tmp_path / "two"),
               "--parallel", "fsdp", "--activation-checkpointing",
               *(f"--{key}={value}" for key, value in settings.items())]  # fmt: skip
    two = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "fsdp over 2 processes" in two.stdout
    one_history = json.loads((tmp_path / "one" / "metrics.json").read_text())["history"]
    two_history = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    for key in ("loss", "accuracy", "val_loss"):
        assert two_history[key] == pytest.approx(one_history[key], abs=1e-5)
    # Stopped after epoch 2 of 3, whose validation loss rose: epoch 1's weights are the ones written.
    assert len(one_history["val_loss"]) == 2 and one_history["val_loss"][1] > one_history["val_loss"][0]
    for written in ("adapter/adapter.safetensors", "model/model.safetensors"):
        one, two = load_file(tmp_path / "one" / written), load_file(tmp_path / "two" / written)
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-5)
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == ["adapter", "metrics.json", "model"]
    load_model(tmp_path / "two" / "model")  # a plain folder: chat, export and load read it


def test_parallel_settings_are_checked_as_trains_are():
    from lmforge.config import apply_values

    with pytest.raises(LmforgeError, match=r"parallel='tp': expected one of \('ddp', 'fsdp', 'hsdp'\)"):
        apply_values(SFTConfig(), {"parallel": "tp"})
    with pytest.raises(LmforgeError, match="hsdp_shard_processes must be >= 0"):
        apply_values(SFTConfig(), {"hsdp_shard_processes": "-1"})
    config = apply_values(SFTConfig(), {"parallel": "hsdp", "activation_checkpointing": "true"})
    assert (config.parallelism().parallel, config.parallelism().activation_checkpointing) == ("hsdp", True)
