"""Learning-rate schedules driven by rollout statistics (docs/math.md §7)."""

from __future__ import annotations

import math
from typing import Any

import torch


class ResponseLengthLRScheduler:
    """Decay the learning rate when the mean response length jumps above its running average.

    A rise of the mean response length is an early warning of training-vs-rollout mismatch
    growth; shrinking the update size suppresses it. On each `step(x)` with x the batch's mean
    response length:

        first call:        ema = x (no decay)
        later calls:       triggered = x > (1 + trigger_ratio) * ema  and  no decay in the
                           previous `cooldown` steps
                           if triggered: lr_g <- max(lr_g * gamma, min_lr) for every param group
                           (a group already at or below min_lr is left alone)
                           ema <- ema_coef * ema + (1 - ema_coef) * x     (after the check)

    `step` takes a Python float or a 0-d tensor, finite and >= 0 (else ValueError); a tensor
    is read with `float()`, a host sync (the scheduler is host-side Python between optimizer
    steps, like torch's schedulers, and is not meant to be traced by torch.compile).

    Args:
        optimizer: a torch.optim.Optimizer.
        ema: the EMA coefficient ema_coef (weight of the old average), in [0, 1).
        trigger_ratio: r > 0, the relative jump that triggers a decay.
        gamma: multiplicative decay in (0, 1].
        cooldown: steps after a decay during which no further decay happens (>= 0).
        min_lr: the floor.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        ema: float = 0.9,
        trigger_ratio: float = 0.15,
        gamma: float = 0.5,
        cooldown: int = 10,
        min_lr: float = 0.0,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not trigger_ratio > 0.0:
            raise ValueError(f"trigger_ratio must be > 0, got {trigger_ratio}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        # (`not x >= 0`: a NaN fails it; `x < 0` let a NaN cooldown or floor turn it off.)
        if not cooldown >= 0:
            raise ValueError(f"cooldown must be >= 0, got {cooldown}")
        if not min_lr >= 0.0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr}")
        self.optimizer = optimizer
        self.ema_coef = ema
        self.trigger_ratio = trigger_ratio
        self.gamma = gamma
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.ema: float | None = None
        self.step_count = 0
        self.last_decay_step: int | None = None
        self.num_decays = 0

    def step(self, mean_response_length: float | torch.Tensor) -> bool:
        """Feed one batch's mean response length; returns True when the lr was decayed."""
        x = float(mean_response_length)
        if not (math.isfinite(x) and x >= 0.0):
            # A NaN would make the average NaN for good: no later step could trigger.
            raise ValueError(f"mean_response_length must be finite and >= 0, got {x}")
        self.step_count += 1
        if self.ema is None:
            self.ema = x
            return False
        cooling = (
            self.last_decay_step is not None
            and self.step_count - self.last_decay_step <= self.cooldown
        )
        triggered = x > (1.0 + self.trigger_ratio) * self.ema and not cooling
        decayed = False
        if triggered:
            for group in self.optimizer.param_groups:
                lr = float(group["lr"])
                if lr > self.min_lr:
                    new_lr = max(lr * self.gamma, self.min_lr)
                    # A tensor lr (compiled or capturable optimizers) is updated in place, as
                    # torch's schedulers do: a step captured with it reads the new value.
                    if isinstance(group["lr"], torch.Tensor):
                        group["lr"].fill_(new_lr)
                    else:
                        group["lr"] = new_lr
                    decayed = True
        if decayed:  # every group already at min_lr: no decay, no cooldown
            self.last_decay_step = self.step_count
            self.num_decays += 1
        self.ema = self.ema_coef * self.ema + (1.0 - self.ema_coef) * x
        return decayed

    def get_last_lr(self) -> list[float]:
        """The current lr of each param group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer (as torch's schedulers)."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
