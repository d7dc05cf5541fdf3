"""The width study on tiny sizes: the laziness metrics fall with the width at least as fast as O(m^-1/2)."""

import json

import pytest
import torch

from lightning_lnsgd.examples.studies import kernel_regime, width

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_linearisation_gap_and_kernel_change_fall_as_a_power_law_of_the_width(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    argv = ["--out", str(tmp_path), "--seeds", "1", "--widths", "32", "128", "512", "--steps", "30",
            "--n-train", "16", "--n-test", "32", "--threads", "1"]
    summary = width.main(argv)
    assert summary["lin_distance"][0] <= -0.4 and summary["kernel_change"][0] <= -0.4, summary
    # the slopes are those of the written per-width results
    rows = (tmp_path / "results.csv").read_text().splitlines()[1:]
    points = sorted((int(r.split(",")[0]), float(r.split(",")[3])) for r in rows)  # kernel_change
    assert kernel_regime.loglog_slope(*zip(*points)) == pytest.approx(summary["kernel_change"][0])
    assert json.loads((tmp_path / "slopes.json").read_text())["lin_distance"]["per_seed"][0] == summary["lin_distance"][0]
    assert (tmp_path / "figure.png").stat().st_size > 0
    # one seed: means without an interval (no "± nan"), and both tables have a header row
    text = (tmp_path / "summary.md").read_text()
    assert "nan" not in text and sum(line.startswith("|---|") for line in text.splitlines()) == 2, text
    torch.set_num_threads(1)  # main set it; the fixture restores the previous value


def test_image_subset_is_fixed_by_its_seed_and_checks_sizes():
    pytest.importorskip("sklearn")
    a, b = kernel_regime.image_subset(n_train=8, n_test=4, seed=3), kernel_regime.image_subset(n_train=8, n_test=4, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y_test, b.y_test) and a.x.shape == (8, 1, 8, 8)
    assert not torch.equal(kernel_regime.image_subset(n_train=8, n_test=4, seed=4).x, a.x)
    with pytest.raises(ValueError, match="n_train=5000"):
        kernel_regime.image_subset(n_train=5000)
    with pytest.raises(ValueError, match="data='mnist' must be"):
        kernel_regime.image_subset("mnist")
