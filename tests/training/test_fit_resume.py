"""A fit run stopped by Ctrl-C or a crash, then resumed, ends exactly where the uninterrupted run ends."""

import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.training.fit import Callback, EarlyStopping, Fittable, WarmupCosine


class Classifier(Fittable, nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.layers(x)


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


class StopAt(Callback):
    """Raises `error` before batch `batch` of epoch `epoch`: a Ctrl-C (KeyboardInterrupt) or a crash."""

    def __init__(self, epoch: int, batch: int, error: BaseException):
        self.at, self.error, self.epoch = (epoch, batch), error, None

    def on_epoch_begin(self, epoch, logs):
        self.epoch = epoch

    def on_batch_begin(self, batch, logs):
        if (self.epoch, batch) == self.at:
            raise self.error


def run(tmp_path, stop: Callback | None = None, resume: bool = False, seed: int | None = 0, every: int = 0):
    model = Classifier()
    model.compile("adamw", loss="sparse_categorical_crossentropy", metrics=["accuracy"], from_logits=True)
    callbacks = [WarmupCosine(), EarlyStopping("val_loss", patience=10), stop or Callback()]  # the same list each run
    x, y = data()
    if seed is None:
        torch.manual_seed(5)  # shuffling draws from torch's own RNG then: the same start for every run
    history = model.fit(
        x, y, epochs=3, batch_size=4, validation_split=0.2, accumulation_steps=2, verbose=0, seed=seed,
        callbacks=callbacks, checkpoint=tmp_path / "state.pt", checkpoint_every=every, resume=resume,
    )  # fmt: skip
    return model, history


@pytest.mark.parametrize("seed", [0, None])
@pytest.mark.parametrize("where", [(1, 3), (1, 4), (0, 0), (2, 0)])  # mid-step, at a step's end, epoch starts
def test_ctrl_c_saves_the_last_step_and_resuming_is_bit_exact(tmp_path, where, seed):
    straight, straight_history = run(tmp_path / "straight", seed=seed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", stop=StopAt(*where, KeyboardInterrupt()), seed=seed)
    assert (tmp_path / "stopped" / "state.pt").is_file()
    resumed, resumed_history = run(tmp_path / "stopped", resume=True, seed=seed)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed_history.history == straight_history.history


def test_a_crash_resumes_from_the_last_periodic_state_bit_exactly(tmp_path):
    straight, straight_history = run(tmp_path / "straight")
    with pytest.raises(RuntimeError):
        run(tmp_path / "crashed", stop=StopAt(1, 7, RuntimeError("power cut")), every=3)  # no save at the crash
    resumed, resumed_history = run(tmp_path / "crashed", resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed_history.history == straight_history.history


def test_resuming_without_a_state_or_from_a_damaged_one_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="resume=True needs the training state"):
        run(tmp_path, resume=True)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LmforgeError, match="state.pt: holds objects other than tensors .* refused to unpickle"):
        run(tmp_path, resume=True)


def test_the_state_holds_only_what_training_changes(tmp_path):
    model, _ = run(tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state["weights"]) == {name for name, p in model.named_parameters() if p.requires_grad}
    model.layers[0].weight.requires_grad_(False)  # a frozen base (LoRA's) comes back from its own file
    from lmforge.training.fit import _trainable_state

    assert "layers.0.weight" not in _trainable_state(model)
