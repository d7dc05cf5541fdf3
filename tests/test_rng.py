"""The counter-based random streams behind sampling and label noise."""

import math

import pytest
import torch

from lightning_lnsgd.rng import CounterRNG, mix64


def test_mix64_matches_reference_splitmix64():
    # Reference SplitMix64 finaliser on Python integers.
    def ref(z):
        M = (1 << 64) - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        z ^= z >> 31
        return z - (1 << 64) if z >= 1 << 63 else z

    values = [0, 1, 2**40 + 7, 2**63 - 1, -(2**63), -12345]
    assert mix64(torch.tensor(values)).tolist() == [ref(v & ((1 << 64) - 1)) for v in values]


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 40)])
def test_chunked_draws_equal_single_draws(shape):
    one = CounterRNG(5, "s")
    singles = torch.stack([one.bits(shape) for _ in range(6)])
    assert torch.equal(CounterRNG(5, "s").bits(shape, n=6), singles)
    # …also when taken from a stack of many replicas (vectorised key path).
    many = CounterRNG([9] * 50 + [5], "s").bits(shape, n=6)
    assert torch.equal(many[-1], singles)


def test_streams_seeds_and_ranks_are_distinct_and_reproducible():
    draw = lambda **kw: CounterRNG(**kw).bits((64,))  # noqa: E731
    base = draw(seeds=1, stream="noise")
    assert torch.equal(base, draw(seeds=1, stream="noise"))
    for other in (draw(seeds=2, stream="noise"), draw(seeds=1, stream="sampling"), draw(seeds=1, stream="noise", rank=1)):
        assert not torch.equal(base, other)


def test_state_dict_resumes_the_stream():
    rng = CounterRNG(0)
    rng.uniform((4,), n=3)
    state = rng.state_dict()
    expected = rng.uniform((4,))
    resumed = CounterRNG(0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.uniform((4,)), expected)


def test_distributions():
    n = 200_000
    u = CounterRNG(1).uniform((n,), dtype=torch.float64)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    z = CounterRNG(2).normal((n,), dtype=torch.float64)
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 0.02
    s = CounterRNG(3).rademacher((n,))
    assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(s.mean()) < 5 / math.sqrt(n)
    k = CounterRNG(4).randint(7, (n,))
    counts = torch.bincount(k, minlength=7).double()
    chi2 = ((counts - n / 7) ** 2 / (n / 7)).sum()
    assert k.min() >= 0 and k.max() <= 6 and chi2 < 30  # 6 dof: P(χ² > 30) < 1e-4


@pytest.mark.parametrize("seeds", [11, [4, 5, 6]])
@pytest.mark.parametrize(("shape", "n"), [((3,), 4000), ((2, 5000), None)])
def test_large_cpu_draws_are_those_of_the_torch_expressions(monkeypatch, seeds, shape, n):
    """Draws past ``COMPILED_FROM`` values come from one compiled pass: the same values, shapes and counters."""
    draws = {}
    for path, threshold in (("compiled", 1), ("torch", 1 << 62)):
        monkeypatch.setattr(CounterRNG, "COMPILED_FROM", threshold)
        rng = CounterRNG(seeds, "s")
        rng.counter = 123
        draws[path] = [
            rng.bits(shape, n), rng.randint(200, shape, n), rng.randint(7, shape, n),
            rng.rademacher(shape, n), rng.rademacher(shape, n, dtype=torch.float64), rng.counter,
        ]
    for compiled, reference in zip(draws["compiled"], draws["torch"]):
        if isinstance(reference, int):
            assert compiled == reference
        else:
            assert compiled.dtype == reference.dtype and torch.equal(compiled, reference)
