"""The examples in the docstrings of the metrics and of the callbacks' math run and give the values they show."""

import doctest
import importlib

import pytest

MODULES = [
    "lightning_lnsgd.metrics.functional.weights",
    "lightning_lnsgd.metrics.functional.laziness",
    "lightning_lnsgd.metrics.weights",
    "lightning_lnsgd.callbacks.pruning",
    "lightning_lnsgd.nn.linearized",
    "lightning_lnsgd.examples.studies.kernel_regime",
    "lightning_lnsgd.examples.studies.runner",
    "lightning_lnsgd.stats",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run with -s to see them)"


def test_every_function_has_an_example() -> None:
    for name in MODULES[:2]:
        module = importlib.import_module(name)
        for fn in module.__all__:
            assert ">>>" in (getattr(module, fn).__doc__ or ""), f"{name}.{fn} has no docstring example"
