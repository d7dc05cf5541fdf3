"""Tests of lightning_lnsgd.callbacks.noise_schedule.NoiseSchedule: the factor of the noise level at each step."""

from __future__ import annotations

import pytest

from lightning_lnsgd.callbacks.noise_schedule import NoiseSchedule


def test_constant_is_one_inside_start_stop_only():
    assert [NoiseSchedule().factor(s) for s in (0, 1, 10**9)] == [1.0, 1.0, 1.0]
    window = NoiseSchedule("constant", start_step=3, stop_step=6)
    assert [window.factor(s) for s in range(8)] == [0, 0, 0, 1, 1, 1, 0, 0]


def test_periodic_on_off_from_start_step():
    per = NoiseSchedule("periodic", start_step=2, period_on=3, period_off=2)
    on = [per.factor(s) for s in range(14)]
    assert on == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    paper = NoiseSchedule("periodic")  # 5000 on / 5000 off
    assert (paper.factor(4999), paper.factor(5000), paper.factor(9999), paper.factor(10000)) == (1, 0, 0, 1)
    capped = NoiseSchedule("periodic", period_on=2, period_off=1, stop_step=4)
    assert [capped.factor(s) for s in range(7)] == [1, 1, 0, 1, 0, 0, 0]


def test_decay_is_linear_to_zero():
    dec = NoiseSchedule("decay", start_step=10, decay_until=20)
    assert [dec.factor(s) for s in (0, 9, 10, 15, 19, 20, 100)] == [0, 0, 1.0, 0.5, pytest.approx(0.1), 0, 0]


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(start_step=4, stop_step=9), dict(schedule="periodic", start_step=1, period_on=2, period_off=3),
     dict(schedule="decay", start_step=2, decay_until=7)],
)
def test_factors_of_a_batch_equal_the_single_factors(kwargs):
    sched = NoiseSchedule(**kwargs)
    for first in range(12):
        for k in (1, 3, 5):
            assert sched.factors(first, k) == [sched.factor(s) for s in range(first, first + k)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule="window"), r"`schedule` must be 'constant', 'periodic' or 'decay', got 'window'"),
        (dict(schedule="cosine"), r"`schedule` must be.*'cosine'"),
        (dict(start_step=-1), r"`start_step` must be an int >= 0, got -1"),
        (dict(start_step=1.5), r"`start_step` must be an int >= 0, got 1\.5"),
        (dict(start_step=5, stop_step=5), r"`stop_step` must be None or an int > `start_step` \(5\), got 5"),
        (dict(schedule="periodic", period_on=0), r"`period_on` to be a positive int.*got 0"),
        (dict(schedule="periodic", period_off=-5), r"`period_off` to be a positive int.*got -5"),
        (dict(schedule="decay"), r"needs `decay_until`.*got None"),
        (dict(schedule="decay", start_step=10, decay_until=5), r"`decay_until`.*> `start_step` \(10\); got 5"),
    ],
)
def test_argument_errors_name_the_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)
