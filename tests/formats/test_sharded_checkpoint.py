"""Sharded checkpoints (torch.distributed.checkpoint, written by parallel=fsdp/hsdp runs): read straight into
one HF folder / GGUF file, written atomically, and damaged ones named. One process here; several in
tests/training/test_parallelize.py."""

import shutil

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.formats.checkpoint import SHARDS, is_sharded, load_model, load_sharded_weights, resolve_checkpoint
from lmforge.training.pretrain import read_metrics, train, train_config_from


def sharded_config(data_dir, out_dir, **overrides):
    return train_config_from({
        "preset": "tiny", "data_dir": str(data_dir), "out_dir": str(out_dir), "batch_size": 4, "max_steps": 8,
        "eval_interval": 0, "log_interval": 1, "checkpoint_interval": 4, "keep_checkpoints": 0, "progress": "none",
        "plot": False, "peak_flops": 1e11, "warmup_steps": 2, "parallel": "fsdp",
    } | overrides)  # fmt: skip


@pytest.fixture(scope="module")
def sharded_run(char_dataset, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharded_run")
    train(sharded_config(char_dataset, out_dir))
    return out_dir


def test_a_sharded_run_writes_shards_and_no_whole_weights_file(sharded_run):
    folder = resolve_checkpoint(sharded_run)
    assert folder.name == "step_000008" and is_sharded(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", SHARDS, "state.pt", "tokenizer.json"]
    model, _, _ = load_model(sharded_run)
    weights = load_sharded_weights(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name


def test_export_reads_a_sharded_checkpoint_into_one_hf_folder_and_one_gguf_file(sharded_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", "--model", str(sharded_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", "--model", str(sharded_run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--dtype", "f32"]) == 0  # fmt: skip
    model, _ = lmforge.load(sharded_run)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(tokens)[0]
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert (hf_model(tokens).logits - expected).abs().max() < 1e-5
        from_gguf, _ = lmforge.load(tmp_path / "m.gguf", keep_quantized=False)
        assert (from_gguf(tokens)[0] - expected).abs().max() < 1e-5


def test_ctrl_c_saves_a_sharded_checkpoint_that_resumes_as_if_never_stopped(sharded_run, char_dataset, tmp_path):
    def press_ctrl_c(step, loss):
        if step == 6:  # between the step-4 and step-8 checkpoints
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(sharded_config(char_dataset, tmp_path), on_step=press_ctrl_c)
    assert resolve_checkpoint(tmp_path).name == "step_000006" and is_sharded(resolve_checkpoint(tmp_path))
    train(sharded_config(char_dataset, tmp_path, resume=True))
    straight = {r["step"]: r["loss"] for r in read_metrics(sharded_run / "metrics.jsonl") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r}
    assert resumed == straight  # one process both times: bit for bit


def test_a_sharded_write_that_fails_leaves_the_previous_checkpoint_and_no_leftovers(
    char_dataset, tmp_path, monkeypatch
):
    import torch.distributed.checkpoint as dcp

    original = dcp.save

    def dies_writing_step_8(state, checkpoint_id):
        original(state, checkpoint_id=checkpoint_id)  # the shards are written ...
        if "step_000008" in str(checkpoint_id):
            raise OSError("disk full")  # ... and the rest of the folder is not

    monkeypatch.setattr(dcp, "save", dies_writing_step_8)
    with pytest.raises(OSError, match="disk full"):
        train(sharded_config(char_dataset, tmp_path))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000004"]
    assert resolve_checkpoint(tmp_path).name == "step_000004"


def test_a_damaged_shard_index_is_named_and_the_older_checkpoint_offered(sharded_run, char_dataset, tmp_path):
    shutil.copytree(sharded_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "checkpoints" / "step_000008" / SHARDS / ".metadata").write_bytes(b"\x80trunc")
    with pytest.raises(LmforgeError, match=r"shards: unreadable shard index[\s\S]*step_000004 is complete"):
        train(sharded_config(char_dataset, tmp_path, resume=True, max_steps=10))


def test_export_of_a_truncated_shard_is_an_error_naming_it(sharded_run, tmp_path, capsys):
    shutil.copytree(sharded_run, tmp_path / "run")
    shard = tmp_path / "run" / "checkpoints" / "step_000008" / SHARDS / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["export", "--model", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "cannot read the sharded weights" in error and "Traceback" not in error
    assert not (tmp_path / "hf").exists()
