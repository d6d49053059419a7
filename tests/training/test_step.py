"""One training step: accumulation gives the big batch's gradients, the update clips, steps and zeroes."""

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from lmforge.training import quickstart
from lmforge.training.data import TokenDataset
from lmforge.training.pretrain import train_config_from
from lmforge.training.step import apply_gradients, forward_backward


def mean_squared_error_forward(model, x, y):
    def forward():
        outputs = model(x)
        return (outputs - y).pow(2).mean(), outputs

    return forward


def test_micro_batches_sum_to_the_gradient_of_the_whole_batch():
    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 1), torch.randn(8, 3), torch.randn(8, 1)
    whole, _ = forward_backward(mean_squared_error_forward(model, x, y), 1, nullcontext())
    expected = model.weight.grad.clone()
    model.zero_grad()
    losses = [forward_backward(mean_squared_error_forward(model, x[i : i + 2], y[i : i + 2]), 4, nullcontext())[0]
              for i in range(0, 8, 2)]  # fmt: skip
    torch.testing.assert_close(model.weight.grad, expected)
    torch.testing.assert_close(torch.stack(losses).mean(), whole)
    assert not losses[0].requires_grad  # detached: holding it keeps no graph alive


def test_the_update_clips_the_global_norm_then_steps_and_frees_the_gradients():
    weight = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    weight.grad = torch.tensor([3.0, 4.0])  # norm 5
    apply_gradients(optimizer, clip_grad_norm=1.0)
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.6, -0.8]))
    assert weight.grad is None
    weight.grad = torch.tensor([3.0, 4.0])
    apply_gradients(optimizer, clip_grad_norm=0.0)  # 0 disables clipping
    torch.testing.assert_close(weight.detach(), torch.tensor([-3.6, -4.8]))


def test_quickstart_times_the_training_step(char_dataset, monkeypatch):
    updates = []
    monkeypatch.setattr(quickstart, "apply_gradients", lambda *args: updates.append(args))
    config = train_config_from({"preset": "tiny", "data_dir": str(char_dataset), "batch_size": 2})
    config.model.vocab_size = TokenDataset(char_dataset).tokenizer().vocab_size
    assert quickstart.seconds_per_step(config, steps=2, warmup_steps=1) > 0
    assert len(updates) == 3 and updates[0][1] == pytest.approx(config.grad_clip)
