"""The learning-rate schedule every trainer uses: linear warmup, then cosine decay, with the warmup
sized to the run. Pretraining (`pretrain.learning_rate_at`) and `fit` (`WarmupCosine`: SFT,
classification, recommendation, vision) both call these, so a run of any length gets the same rule.
"""

from __future__ import annotations

import math

# A fixed warmup is wrong for every run but one length: 100 steps never finish in a 50-step run,
# and 5 steps are a whole 5-step fine-tune (a single step at a fifth of the rate). So by default
# the warmup is a tenth of the run, at most 100 steps (what a 1,000-step run or longer always had).
WARMUP_FRACTION = 0.1
MAX_DEFAULT_WARMUP_STEPS = 100


def warmup_steps_for(total_steps: int, requested: int | None = None) -> int:
    """The warmup length of a run of `total_steps` optimizer steps: `requested` when given (even if
    longer than the run: `warmup_warning` says so), else a tenth of the run, at most 100 steps."""
    if requested is not None:
        return requested
    return min(MAX_DEFAULT_WARMUP_STEPS, int(total_steps * WARMUP_FRACTION))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """The learning rate at optimizer step `step` (0-based): linear from peak/warmup_steps up to
    `peak` at step warmup_steps - 1, then a cosine down to `floor` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def reached_peak(steps_taken: int, warmup_steps: int) -> bool:
    """Whether a run that took `steps_taken` optimizer steps got to its peak learning rate."""
    return steps_taken >= max(warmup_steps, 1)


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    """What to tell the user when the warmup outlasts the run, else None."""
    if warmup_steps <= total_steps:
        return None
    return (
        f"warning: warmup_steps={warmup_steps} is longer than the run's {total_steps} optimizer steps: the "
        f"learning rate never reaches its peak (it ends at {total_steps / warmup_steps:.0%} of it); "
        f"lower warmup_steps or leave it unset (a tenth of the run)"
    )
