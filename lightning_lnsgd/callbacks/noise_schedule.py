"""When label noise is on: the schedule of :class:`~lightning_lnsgd.LabelNoise`, a function of the optimizer step."""

from __future__ import annotations

from typing import Literal

from ..checks import is_int

__all__ = ["SCHEDULES", "NoiseSchedule"]

#: The schedule names :class:`NoiseSchedule` accepts.
SCHEDULES = ("constant", "periodic", "decay")



class NoiseSchedule:
    """The multiplier in [0, 1] of the full noise level at each optimizer step ``s`` (``trainer.global_step``).

    Args:
        schedule: ``"constant"``: 1 in ``[start_step, stop_step)``;
            ``"periodic"``: 1 for ``period_on`` steps, then 0 for ``period_off`` steps, repeating from
            ``start_step``, within ``[start_step, stop_step)``;
            ``"decay"``: falls linearly from 1 at ``start_step`` to 0 at ``decay_until`` and stays 0.
        start_step: first optimizer step with noise (≥ 0); the factor is 0 before it.
        stop_step: first optimizer step without noise again (> ``start_step``), or ``None``: never.
        period_on: steps on of ``"periodic"`` (> 0).
        period_off: steps off of ``"periodic"`` (> 0).
        decay_until: the step at which ``"decay"`` reaches 0 (> ``start_step``; required for ``"decay"``).
    """

    def __init__(
        self,
        schedule: Literal["constant", "periodic", "decay"] = "constant",
        start_step: int = 0,
        stop_step: int | None = None,
        period_on: int = 5000,
        period_off: int = 5000,
        decay_until: int | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"LabelNoise: `schedule` must be 'constant', 'periodic' or 'decay', got {schedule!r}.")
        if not is_int(start_step) or start_step < 0:
            raise ValueError(f"LabelNoise: `start_step` must be an int >= 0, got {start_step!r}.")
        if stop_step is not None and (not is_int(stop_step) or stop_step <= start_step):
            raise ValueError(
                f"LabelNoise: `stop_step` must be None or an int > `start_step` ({start_step}), got {stop_step!r}."
            )
        if schedule == "periodic":
            for name, value in (("period_on", period_on), ("period_off", period_off)):
                if not is_int(value) or value <= 0:
                    raise ValueError(
                        f"LabelNoise: schedule='periodic' needs `{name}` to be a positive int (steps), got {value!r}."
                    )
        if schedule == "decay" and (not is_int(decay_until) or decay_until <= start_step):
            raise ValueError(
                f"LabelNoise: schedule='decay' needs `decay_until` as an int > `start_step` ({start_step});"
                f" got {decay_until!r}."
            )
        self.schedule = schedule
        self.start_step = int(start_step)
        self.stop_step = stop_step
        self.period_on = int(period_on)
        self.period_off = int(period_off)
        self.decay_until = decay_until

    def inside(self, step: int) -> bool:
        """Whether ``step`` lies in ``[start_step, stop_step)``."""
        return step >= self.start_step and (self.stop_step is None or step < self.stop_step)

    def factor(self, step: int) -> float:
        """The multiplier of the full level at optimizer step ``step``, in [0, 1]."""
        step = int(step)
        if not self.inside(step):
            return 0.0
        if self.schedule == "periodic":
            return 1.0 if (step - self.start_step) % (self.period_on + self.period_off) < self.period_on else 0.0
        if self.schedule == "decay":
            return max(0.0, (self.decay_until - step) / (self.decay_until - self.start_step))  # type: ignore[operator]
        return 1.0

    def factors(self, first: int, k: int) -> list[float]:
        """``[factor(first), …, factor(first + k − 1)]``: the factors of the ``k`` SGD steps of one batch."""
        if self.schedule == "constant" and self.inside(first) and self.inside(first + k - 1):
            return [1.0] * k  # the fused path's common case, without k Python calls
        return [self.factor(s) for s in range(first, first + k)]

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule({self.schedule!r}, start_step={self.start_step}, stop_step={self.stop_step}, "
            f"period_on={self.period_on}, period_off={self.period_off}, decay_until={self.decay_until})"
        )
