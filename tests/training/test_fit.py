"""Keras-style compile/fit/evaluate/predict: the bar, the history, callbacks, class weights, accumulation."""

import io
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.evaluation.metrics import confusion_matrix, macro_f1
from lmforge.training.fit import (
    Callback,
    EarlyStopping,
    Fittable,
    LearningRateScheduler,
    ModelCheckpoint,
    ProgressBar,
    TrainingSetup,
    WarmupCosine,
    binary_crossentropy,
)


class Logistic(Fittable, nn.Module):
    def __init__(self, inputs: int = 2, outputs: int = 1):
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)

    def forward(self, x):
        out = self.linear(x)
        return torch.sigmoid(out).squeeze(-1) if out.shape[-1] == 1 else out


def separable(count=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 2, generator=generator)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def test_keras_workflow_prints_the_bar_and_fills_history():
    torch.manual_seed(0)
    x, y = separable()
    model = Logistic()
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"], learning_rate=0.05)
    out = io.StringIO()
    history = model.fit(x, y, epochs=5, batch_size=32, validation_split=0.2, stream=out)
    text = out.getvalue()
    assert text.count("Epoch ") == 5 and "Epoch 5/5" in text
    # 320 training examples (the last 20% validate) in batches of 32 → 10 steps per epoch.
    line = re.compile(
        r"^10/10 ━{20} \d+s \d+ms/step - loss: \d\.\d{4} - accuracy: \d\.\d{4} - val_loss: \d\.\d{4} - val_accuracy",
        re.M,
    )
    assert len(line.findall(text)) == 5, text
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    assert all(len(values) == 5 for values in history.history.values()) and history.epoch == [0, 1, 2, 3, 4]
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["val_accuracy"][-1] > 0.9
    result = model.evaluate(x[320:], y[320:])
    assert result["accuracy"] == pytest.approx(history.history["val_accuracy"][-1])
    probabilities = model.predict(x[:7])
    assert probabilities.shape == (7,) and ((probabilities >= 0) & (probabilities <= 1)).all()


def test_live_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = ProgressBar(40, stream)
    bar.last_draw = -1.0
    bar.update(12, {"loss": 0.3909, "accuracy": 0.8129})
    bar.finish({"loss": 0.3, "accuracy": 0.9})
    text = stream.getvalue()
    assert text.startswith("\r12/40 ━━━━━━────────────── ") and "ms/step - loss: 0.3909 - accuracy: 0.8129" in text
    assert text.endswith("\n") and "\r40/40 ━━━━━━━━━━━━━━━━━━━━" in text


def test_a_long_epoch_in_a_log_writes_progress_lines():
    stream = io.StringIO()  # not a terminal
    bar = ProgressBar(100, stream, log_seconds=0.0)
    bar.update(30, {"loss": 0.5})
    bar.update(60, {"loss": 0.4})
    bar.finish({"loss": 0.3})
    lines = stream.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["30/100", "60/100", "100/100"] and "\r" not in stream.getvalue()


def test_binary_crossentropy_matches_the_formula():
    p, y = torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1, 0, 0])
    expected = -(y * p.log() + (1 - y) * (1 - p).log())
    assert torch.allclose(binary_crossentropy(p, y, from_logits=False), expected)
    logits = torch.tensor([2.0, -1.0, 0.5])
    assert torch.allclose(
        binary_crossentropy(logits, y, True), binary_crossentropy(torch.sigmoid(logits), y, False), atol=1e-6
    )


def test_early_stopping_stops_and_restores_the_best_weights():
    torch.manual_seed(0)
    x, y = separable()
    model = Logistic()
    model.compile("sgd", "binary_crossentropy", learning_rate=0.1)
    snapshots = []

    class Snapshot(Callback):
        def on_epoch_end(self, epoch, logs):
            snapshots.append(model.linear.weight.detach().clone())

    # No epoch can improve the loss by 10, so the first epoch stays best and the second stops training.
    stopper = EarlyStopping("loss", patience=1, min_delta=10, restore_best_weights=True)
    history = model.fit(x, y, epochs=20, callbacks=[Snapshot(), stopper], verbose=0)
    assert history.epoch == [0, 1] and stopper.stopped_epoch == 1
    assert torch.equal(model.linear.weight, snapshots[0]) and not torch.equal(snapshots[0], snapshots[1])


def test_early_stopping_waits_for_patience_on_validation_loss():
    torch.manual_seed(0)
    x, y = separable()
    model = Logistic()
    model.compile("adam", "binary_crossentropy", learning_rate=0.05)
    history = model.fit(x, y, epochs=30, validation_split=0.2, callbacks=[EarlyStopping(patience=3)], verbose=0)
    losses = history.history["val_loss"]
    if len(losses) < 30:  # stopped: the last 3 epochs did not beat the best before them
        assert min(losses[-3:]) >= min(losses[:-3])


def test_model_checkpoint_saves_only_improvements_atomically(tmp_path):
    torch.manual_seed(0)
    x, y = separable()
    model = Logistic()
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"], learning_rate=0.05)
    checkpoint = ModelCheckpoint(tmp_path / "best-{epoch:02d}.safetensors", monitor="val_loss")
    history = model.fit(x, y, epochs=4, validation_split=0.25, callbacks=[checkpoint], verbose=0)
    best_so_far, expected = float("inf"), []
    for epoch, loss in enumerate(history.history["val_loss"], start=1):
        if loss < best_so_far:
            best_so_far = loss
            expected.append(tmp_path / f"best-{epoch:02d}.safetensors")
    assert checkpoint.saved == expected and all(path.exists() for path in expected)
    assert not list(tmp_path.glob("*.tmp"))
    weights = load_file(str(expected[-1]))
    assert set(weights) == {"linear.weight", "linear.bias"}


def test_class_weights_change_what_is_learned():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 2, generator=generator)
    y = (torch.rand(200, generator=generator) < 0.9).long()  # 90% class 1, unrelated to x
    plain, weighted = Logistic(), Logistic()
    for model, class_weight in ((plain, None), (weighted, {0: 1.0, 1: 0.0})):
        torch.manual_seed(0)
        model.compile("adam", "binary_crossentropy", learning_rate=0.05)
        model.fit(x, y, epochs=20, class_weight=class_weight, verbose=0)
    assert (plain.predict(x) > 0.5).float().mean() > 0.8
    assert (weighted.predict(x) > 0.5).float().mean() < 0.2  # class 1 weighs nothing: everything looks like 0
    with pytest.raises(LmforgeError, match=r"no weight for classes \[1\]"):
        weighted.fit(x, y, class_weight={0: 1.0}, verbose=0)


def test_gradient_accumulation_equals_the_bigger_batch():
    x, y = separable(64)
    models = []
    for batch_size, accumulation in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = Logistic(2, 2)
        model.compile("sgd", "sparse_categorical_crossentropy", from_logits=True, learning_rate=0.5)
        model.fit(x, y, epochs=2, batch_size=batch_size, accumulation_steps=accumulation, shuffle=False, verbose=0)
        models.append(model)
    assert torch.allclose(models[0].linear.weight, models[1].linear.weight, atol=1e-6)


def test_schedules_set_the_learning_rate():
    x, y = separable(64)
    model = Logistic()
    model.compile("sgd", "binary_crossentropy", learning_rate=1.0)
    history = model.fit(
        x, y, epochs=3, callbacks=[LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))], verbose=0
    )
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3])

    model.compile("sgd", "binary_crossentropy", learning_rate=1.0)
    seen = []

    class Record(Callback):
        def on_batch_end(self, batch, logs):
            seen.append(model.training_setup.optimizer.param_groups[0]["lr"])

    model.fit(
        x, y, epochs=2, batch_size=8, callbacks=[WarmupCosine(warmup_steps=4, min_ratio=0.0), Record()], verbose=0
    )
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up
    assert all(a >= b for a, b in zip(seen[4:], seen[5:])) and seen[-1] < 0.05  # cosine down towards 0


def learning_rates_of_each_step(model, x, y, schedule, **options) -> list[float]:
    seen = []

    class Record(Callback):
        def on_batch_end(self, batch, logs):
            seen.append(model.training_setup.optimizer.param_groups[0]["lr"])

    model.fit(x, y, callbacks=[schedule, Record()], verbose=0, **options)
    return seen


def test_warmup_cosine_default_warmup_is_sized_to_the_run():
    x, y = separable(40)
    model = Logistic()
    model.compile("sgd", "binary_crossentropy", learning_rate=1.0)
    short = WarmupCosine(min_ratio=0.0)
    seen = learning_rates_of_each_step(model, x, y, short, epochs=1, batch_size=8)  # 5 optimizer steps
    assert short.warmup_steps == 0 and short.reached_peak
    assert seen[0] == pytest.approx(1.0)  # a 5-step run starts at its peak instead of warming up through it
    model.compile("sgd", "binary_crossentropy", learning_rate=1.0)
    longer = WarmupCosine(min_ratio=0.0)
    seen = learning_rates_of_each_step(model, x, y, longer, epochs=10, batch_size=2)  # 200 steps
    assert longer.warmup_steps == 20 and seen[:2] == pytest.approx([0.05, 0.1]) and seen[19] == pytest.approx(1.0)


def test_warmup_longer_than_the_run_warns_and_is_flagged(capsys):
    x, y = separable(40)
    model = Logistic()
    model.compile("sgd", "binary_crossentropy", learning_rate=1.0)
    schedule = WarmupCosine(warmup_steps=10)
    seen = learning_rates_of_each_step(model, x, y, schedule, epochs=1, batch_size=8)
    assert "warmup_steps=10 is longer than the run's 5 optimizer steps" in capsys.readouterr().err
    assert not schedule.reached_peak and max(seen) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x, y: m.fit(x, y), "call compile"),
        (lambda m, x, y: m.compile(loss="hinge"), "unknown loss 'hinge'"),
        (lambda m, x, y: m.compile(optimizer="lion"), "unknown optimizer 'lion'"),
        (lambda m, x, y: m.compile(metrics=["auc"]), r"unknown metrics \['auc'\]"),
        (lambda m, x, y: (m.compile(), m.fit(x, y[:-1])), "x has 10 examples but y has 9"),
        (lambda m, x, y: (m.compile(), m.fit(x, y, validation_split=1.5)), "validation_split"),
    ],
)
def test_mistakes_are_named(call, message):
    model, (x, y) = Logistic(), separable(10)
    with pytest.raises(LmforgeError, match=message):
        call(model, x, y)


def test_inputs_may_be_a_tuple_or_a_dict():
    class Two(Fittable, nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, a, b):
            return self.linear(a * b)

    x, y = separable(40)
    model = Two()
    model.compile("adam", "sparse_categorical_crossentropy", from_logits=True)
    model.fit((x, torch.ones_like(x)), y, epochs=1, verbose=0)
    assert model.predict({"a": x, "b": torch.ones_like(x)}).shape == (40, 2)


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    generator = torch.Generator().manual_seed(0)
    labels, predicted = (
        torch.randint(0, 4, (300,), generator=generator),
        torch.randint(0, 4, (300,), generator=generator),
    )
    assert macro_f1(confusion_matrix(predicted, labels, 4)) == pytest.approx(
        f1_score(labels.numpy(), predicted.numpy(), average="macro")
    )


def test_named_optimizers_take_learning_rate_and_weight_decay():
    model = Logistic()
    model.compile("adamw", "binary_crossentropy", learning_rate=0.02, weight_decay=0.1)
    group = model.training_setup.optimizer.param_groups[0]
    assert isinstance(model.training_setup.optimizer, torch.optim.AdamW) and (group["lr"], group["weight_decay"]) == (
        0.02,
        0.1,
    )
    model.compile("adamw", "binary_crossentropy")
    assert model.training_setup.optimizer.param_groups[0]["weight_decay"] == 0.01  # Keras's AdamW default


def test_the_state_compile_and_callbacks_share_is_declared_on_fittable():
    x, y = separable(40)
    model = Logistic()
    assert model.training_setup is None and model.stop_training is False
    model.compile("sgd", "binary_crossentropy")
    assert isinstance(model.training_setup, TrainingSetup) and "training_setup" not in dict(model.named_children())

    class StopAfterTheSecondEpoch(Callback):  # Keras's habit: a callback sets model.stop_training
        def on_epoch_end(self, epoch, logs):
            self.model.stop_training = epoch == 1

    history = model.fit(x, y, epochs=10, callbacks=[StopAfterTheSecondEpoch()], verbose=0)
    assert history.epoch == [0, 1]


def test_torch_compile_stays_reachable_beside_kerass_compile():
    torch.manual_seed(0)
    model, x = Logistic(2, 2), torch.randn(5, 2)
    expected = model(x)
    torch.testing.assert_close(torch.compile(model, backend="eager")(x), expected)
    nn.Module.compile(model, backend="eager")  # in place, as `model.compile` would be on a plain module
    torch.testing.assert_close(model(x), expected)
    model.compile("adam", "sparse_categorical_crossentropy", from_logits=True)  # Keras's compile still
    assert isinstance(model.training_setup.optimizer, torch.optim.Adam)
