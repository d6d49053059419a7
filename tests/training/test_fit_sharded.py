"""`fit` under parallel=fsdp: 2 gloo processes (torchrun) against 1 with the same global batch, full
fine-tuning and LoRA, with and without activation checkpointing; sharded training states resumed on a
different number of processes. The torchrun processes run this file's `train` (`python -m` this module)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.finetune.lora import ALL_TARGETS, LoraConfig, apply_lora
from lmforge.finetune.sft import NextTokenModel
from lmforge.formats.checkpoint import SHARDS
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES, Parallelism
from lmforge.training import distributed
from lmforge.training import fit as fit_module
from lmforge.training.fit import Callback, EarlyStopping, Fittable, ModelCheckpoint, WarmupCosine, load_weights
from lmforge.training.parallelize import gather_full_weights, weightless_copy, whole_weights

ROOT = Path(__file__).resolve().parents[2]
VOCAB, STEPS = 24, 8


class Recorder(Callback):
    """Every batch's running epoch loss and accuracy: equal running means are equal batch losses."""

    def __init__(self):
        self.records: dict[tuple[int, int], tuple[float, float]] = {}

    def on_epoch_begin(self, epoch, logs):
        self.epoch = epoch

    def on_batch_end(self, batch, logs):
        self.records[(self.epoch, batch)] = (logs["loss"], logs["accuracy"])


class CrashAfter(Callback):
    """A crash (not a Ctrl-C: nothing saved then) as the step after optimizer step `step` begins."""

    def __init__(self, step: int | None):
        self.step = step

    def on_batch_begin(self, batch, logs):
        if self.params["optimizer_step"] == self.step:
            raise RuntimeError(f"crashed after step {self.step}")


def data() -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """9 rows of 16 tokens, the first 4 of each not scored (a prompt)."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (9, 16), generator=generator)
    targets = tokens.roll(-1, 1)
    targets[:, :4] = targets[:, -1] = -100
    return (tokens, torch.ones_like(tokens)), targets


class CtrlCInLastProcess(Callback):
    """Ctrl-C as optimizer step `step` ends, delivered to the job's last process only: the others learn
    of it at the step's end (`distributed.StopRequests`)."""

    def __init__(self, step: int | None):
        self.step = step

    def on_batch_end(self, batch, logs):
        last = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
        if self.params["optimizer_step"] == self.step and last:
            os.kill(os.getpid(), signal.SIGINT)


class WeightsEachEpoch(Callback):
    """The whole weights at each epoch's end (sharded: every process gathers, the main one keeps them)."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, epoch, logs):
        self.weights.append(whole_weights(self.model))


def train(out: Path, parallel: str = "fsdp", lora: bool = False, checkpointing: bool = False,
          crash_after: int | None = None, resume: bool = False, best: bool = False,
          interrupt_after: int | None = None) -> dict:  # fmt: skip
    """8 optimizer steps of a tiny language model: 4 epochs of 9 rows in batches of 4, two batches a step,
    so each epoch's last batch is one row that a second process has none of. Returns (on the main
    process) each batch's logs and the trained weights, gathered whole. `best`: validation on the training
    rows, ModelCheckpoint of the best epoch (epoch 2: the validation loss falls), and EarlyStopping that
    restores its own best with a `min_delta` no epoch after the first can meet: the run stops after epoch
    2 with epoch 1's weights. The result adds the weights at each epoch's end and those ModelCheckpoint
    wrote, read back into the model."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, block_size=16, n_layers=2, n_heads=2, d_model=32, **LLAMA_SWITCHES)
    model = Transformer(config)
    if lora:
        apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS))
    trainer = NextTokenModel(model)
    processes = distributed.init_process_group("cpu")
    sharded = processes.is_distributed and parallel != "ddp"
    whole = weightless_copy(trainer) if sharded else trainer
    # hsdp: shard groups of 2 (processes 0-1 and 2-3 each hold a whole copy between them)
    parallelism = Parallelism(parallel, 2 if parallel == "hsdp" else 0, checkpointing)
    trainer.compile("adamw", "token_crossentropy", ["accuracy"], from_logits=True, learning_rate=1e-2,
                    clip_grad_norm=0.5, parallelism=parallelism)  # fmt: skip
    recorder, each_epoch = Recorder(), WeightsEachEpoch()
    x, y = data()
    best_file = out / "best.safetensors"
    callbacks = [WarmupCosine(2), recorder, CrashAfter(crash_after), CtrlCInLastProcess(interrupt_after)]
    if best:
        callbacks += [ModelCheckpoint(best_file), EarlyStopping(patience=1, min_delta=1e9, restore_best_weights=True),
                      each_epoch]  # fmt: skip
    trainer.fit(x, y, epochs=4, batch_size=4, accumulation_steps=2, verbose=0, seed=0, callbacks=callbacks,
                validation_data=(x, y) if best else None, checkpoint=out / "state", checkpoint_every=1,
                resume=resume)  # fmt: skip
    if sharded:
        gather_full_weights(trainer, whole, processes.is_main)
    result = {"records": recorder.records, "weights": {k: v.detach().clone() for k, v in whole.state_dict().items()}}
    if best:
        load_weights(trainer, best_file)
        result |= {"each_epoch": each_epoch.weights, "best_file": whole_weights(trainer)}
    if processes.is_main:
        torch.save(result, out / "result.pt")
    distributed.shutdown(processes)
    return result


def torchrun(processes: int, out: Path, *options: str, expect_success: bool = True) -> dict | None:
    """`train` in `processes` gloo processes (a free port: --standalone); its result."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "tests.training.test_fit_sharded", str(out), *options]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300)
    assert (result.returncode == 0) == expect_success, result.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=True) if expect_success else None


def assert_same_run(reference: dict, other: dict, after_step: int = 0) -> None:
    """The same losses and accuracies batch by batch (those after optimizer step `after_step`: a resumed
    run's), and the same weights."""
    assert len(reference["records"]) == 12  # 4 epochs of 3 batches
    first = (after_step // 2, 2 * (after_step % 2))  # (epoch, batch): two steps an epoch, two batches a step
    batches = sorted(key for key in reference["records"] if key >= first)
    assert sorted(other["records"]) == batches
    for key in batches:
        assert other["records"][key] == pytest.approx(reference["records"][key], abs=1e-5), key
    assert reference["weights"].keys() == other["weights"].keys()
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(other["weights"][name], weight, atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The reference: one process, the whole global batch, a plain model; parallel=fsdp, so its training
    state is the sharded folder two processes resume."""
    out = tmp_path_factory.mktemp("alone")
    return out, train(out)


def test_fsdp_on_two_processes_matches_one_process(alone, tmp_path):
    assert_same_run(alone[1], torchrun(2, tmp_path))
    shards = sorted(path.name for path in (tmp_path / "state" / SHARDS).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shard


@pytest.mark.slow  # the default suite runs LoRA with activation checkpointing through sft (test_sft.py)
def test_lora_with_activation_checkpointing_on_two_processes_matches_one_process(tmp_path):
    reference = train(tmp_path / "alone", lora=True)
    two = torchrun(2, tmp_path / "two", "--lora", "--checkpointing")
    assert_same_run(reference, two)
    base = {name: weight for name, weight in two["weights"].items() if "lora" not in name}
    assert any("lora_b" in name and weight.abs().sum() > 0 for name, weight in two["weights"].items())
    torch.manual_seed(0)  # the base as it was built: frozen, unchanged by training
    untouched = Transformer(ModelConfig(vocab_size=VOCAB, block_size=16, n_layers=2, n_heads=2, d_model=32,
                                        **LLAMA_SWITCHES)).state_dict()  # fmt: skip
    for name, weight in base.items():
        plain = name.removeprefix("model.").replace(".base.", ".")
        assert torch.equal(weight, untouched[plain]), name
    # The sharded training state holds what trains (the adapters) and the optimizer state, not the base.
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(tmp_path / "two" / "state" / SHARDS).read_metadata().state_dict_metadata
    weights = [key for key in keys if key.startswith("model.")]
    assert weights and all(key.endswith(("lora_a", "lora_b")) for key in weights)


@pytest.mark.slow
@pytest.mark.parametrize("lora, checkpointing", [(False, True), (True, False)])
def test_the_other_combinations_on_two_processes_match_one_process(alone, tmp_path, lora, checkpointing):
    reference = alone[1] if not lora else train(tmp_path / "alone", lora=True)
    options = ["--lora"] * lora + ["--checkpointing"] * checkpointing
    assert_same_run(reference, torchrun(2, tmp_path / "two", *options))


@pytest.mark.slow
def test_hsdp_on_four_processes_as_two_by_two_matches_one_process(alone, tmp_path):
    # A batch of 4 is one row a process; each epoch's last batch leaves three processes a stand-in.
    assert_same_run(alone[1], torchrun(4, tmp_path, "--parallel=hsdp"))


@pytest.mark.slow
def test_a_state_from_two_processes_resumes_on_one(alone, tmp_path):
    torchrun(2, tmp_path, "--crash-after=3", expect_success=False)  # mid-epoch: the metrics' state counts
    assert_same_run(alone[1], train(tmp_path, resume=True), after_step=3)


def test_ctrl_c_in_one_process_saves_the_step_every_process_finished(alone, tmp_path):
    """Ctrl-C reaches one process of two as step 3 ends (a terminal's reaches all; torchrun forwards it to
    all): both save step 3's shards together and stop; the run resumes from there on one process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.training.test_fit_sharded", str(tmp_path), "--interrupt-after=3"]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300)
    assert run.returncode != 0 and "KeyboardInterrupt" in run.stderr
    assert f"interrupted: saved the last completed step to {tmp_path / 'state'}" in run.stderr
    shards = sorted(path.name for path in (tmp_path / "state" / SHARDS).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert_same_run(alone[1], train(tmp_path, resume=True), after_step=3)


@pytest.mark.slow
def test_a_state_from_one_process_resumes_on_two(alone, tmp_path):
    with pytest.raises(RuntimeError, match="crashed after step 5"):
        train(tmp_path, crash_after=5)
    assert_same_run(alone[1], torchrun(2, tmp_path, "--resume"), after_step=5)


def test_the_best_epoch_is_kept_and_restored_from_shards_as_from_one_process(tmp_path):
    """ModelCheckpoint gathers the shards into one file; EarlyStopping(restore_best_weights) keeps the
    best epoch whole on the main process and puts it back into every process's shard."""
    alone = train(tmp_path / "alone", best=True)
    two = torchrun(2, tmp_path / "two", "--best")
    assert (
        sorted(two["records"])
        == sorted(alone["records"])
        == [(epoch, batch) for epoch in (0, 1) for batch in (0, 1, 2)]
    )
    for key, record in alone["records"].items():
        assert two["records"][key] == pytest.approx(record, abs=1e-5), key
    for run in (alone, two):
        assert len(run["each_epoch"]) == 2  # stopped after epoch 2, which changed the weights
        assert any(not torch.equal(run["each_epoch"][1][name], weight) for name, weight in run["weights"].items())
        for name, weight in run["each_epoch"][0].items():  # restored: epoch 1's weights
            torch.testing.assert_close(run["weights"][name], weight, atol=0, rtol=0, msg=name)
        for name, weight in run["each_epoch"][1].items():  # the file: epoch 2's, whose val_loss is lower
            torch.testing.assert_close(run["best_file"][name], weight, atol=0, rtol=0, msg=name)
    for name, weight in alone["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, atol=1e-5, rtol=1e-5, msg=name)
    from safetensors.torch import load_file

    tied = {"model.lm_head.weight", "model.token_embedding.weight"}
    assert len(tied & load_file(tmp_path / "two" / "best.safetensors").keys()) == 1  # one name of a tied weight


def test_a_sharded_state_alone_resumes_bit_exactly(alone, tmp_path):
    with pytest.raises(RuntimeError, match="crashed after step 3"):
        train(tmp_path, crash_after=3)
    assert (tmp_path / "state" / SHARDS / ".metadata").is_file() and (tmp_path / "state" / "state.pt").is_file()
    resumed = train(tmp_path, resume=True)
    assert resumed["records"] == {key: value for key, value in alone[1]["records"].items() if key >= (1, 2)}
    for name, weight in alone[1]["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


def test_a_state_of_the_other_kind_or_damaged_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(RuntimeError):
        train(tmp_path, parallel="ddp", crash_after=1)  # one file
    with pytest.raises(LmforgeError, match="written by a parallel=ddp run.*resume it with parallel=ddp"):
        train(tmp_path, resume=True)
    (tmp_path / "state").unlink()
    with pytest.raises(RuntimeError):
        train(tmp_path, crash_after=1)  # a folder of shards
    with pytest.raises(LmforgeError, match="written by a parallel=fsdp/hsdp run"):
        train(tmp_path, parallel="ddp", resume=True)
    (tmp_path / "state" / SHARDS / ".metadata").unlink()  # a damaged state: named, not a traceback
    with pytest.raises(LmforgeError, match=r"state/shards: cannot resume from these shards"):
        train(tmp_path, resume=True)


class Linear(Fittable, nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        return self.linear(x)


def test_what_sharding_cannot_take_is_refused_in_one_line(monkeypatch, tmp_path):
    with pytest.raises(LmforgeError, match="activation_checkpointing: the model has no `blocks` list"):
        Linear().compile(parallelism=Parallelism(activation_checkpointing=True))
    # As under torchrun (a mesh to shard over): an optimizer built before sharding would miss the shards.
    monkeypatch.setattr(fit_module, "device_mesh", lambda *args: object())
    model = Linear()
    with pytest.raises(LmforgeError, match="parallel=fsdp: pass the optimizer by name or as a factory"):
        model.compile(torch.optim.SGD(model.parameters(), lr=0.1), parallelism=Parallelism("fsdp"))
    monkeypatch.undo()


def test_a_weightless_copy_holds_no_memory_keeps_ties_and_takes_the_weights_for_writing():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, block_size=16, n_layers=2, n_heads=2, d_model=32,
                                    tie_embeddings=True))  # fmt: skip
    copy = weightless_copy(model)
    assert all(parameter.is_meta for parameter in copy.parameters())
    assert copy.lm_head.weight is copy.token_embedding.weight
    assert not model.lm_head.weight.is_meta  # the original is untouched
    copy.load_state_dict(model.state_dict(), assign=True)
    for name, weight in model.state_dict().items():
        assert torch.equal(copy.state_dict()[name], weight), name


if __name__ == "__main__":  # one process of a torchrun job (see `torchrun`)
    out, *options = sys.argv[1:]
    values = dict(option[2:].split("=") for option in options if "=" in option)
    train(Path(out), values.get("parallel", "fsdp"), "--lora" in options, "--checkpointing" in options,
          int(values["crash-after"]) if "crash-after" in values else None, "--resume" in options,
          "--best" in options, int(values["interrupt-after"]) if "interrupt-after" in values else None)  # fmt: skip
