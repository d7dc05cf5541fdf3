"""The Fig. 5 study on tiny sizes: every setting runs through Lightning, distances are measured against the
linearised run, and the CIFAR-10 switch works on the miniature archive."""

import pytest
import torch

from lightning_lnsgd.examples.cifar_files import write_cifar10_archive
from lightning_lnsgd.examples.studies import fig5
from lightning_lnsgd.report import load_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--seeds", "1", "--width", "16", "--steps", "4", "--record-every", "2", "--threads", "1"]


def _metric(rows, setting, metric):
    return next(r["mean"] for r in rows if r["setting"] == setting and r["metric"] == metric)


def test_digits_settings_against_the_linearised_run(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    rows = fig5.main(["--out", str(tmp_path), *TINY, "--n-train", "16", "--n-test", "16"])
    assert {r["setting"] for r in rows} == set(fig5.SETTINGS)
    # the Taylor model is exactly lazy, and it is its own reference
    assert _metric(rows, "lin", "dist_to_lin") == 0 and _metric(rows, "lin", "linearization_gap") < 1e-4
    # the distance is recomputed independently from the saved test outputs
    gd = torch.load(tmp_path / "runs" / "gd" / "seed_0" / "outputs.pt")
    lin = torch.load(tmp_path / "runs" / "lin" / "seed_0" / "outputs.pt")
    assert gd["steps"] == lin["steps"] == [0, 2, 4]
    torch.testing.assert_close(gd["outputs"][0], lin["outputs"][0])  # the same initial network
    expected = ((gd["outputs"][-1] - lin["outputs"][-1]).norm() / (lin["outputs"][-1] - lin["outputs"][0]).norm()).item()
    assert _metric(rows, "gd", "dist_to_lin") == pytest.approx(expected)
    assert 0 < expected < 1
    logged = load_scalars(tmp_path / "runs" / "gd" / "seed_0")  # TensorBoard: the losses and the laziness metrics
    assert [v for _, v in logged["fig5/test_loss"]] == pytest.approx(gd["test_loss"])
    assert {"laziness/linearization_gap", "laziness/kernel_distance", "train/loss"} <= set(logged)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "figure.png").stat().st_size > 0


def test_cifar10_switch_on_the_miniature_archive(tmp_path):
    pytest.importorskip("matplotlib")
    write_cifar10_archive(tmp_path / "data", n_per_batch=4, n_test=8, extract=True)
    rows = fig5.main(["--out", str(tmp_path / "out"), *TINY, "--data", "cifar10", "--data-dir", str(tmp_path / "data"),
                      "--n-train", "8", "--n-test", "4", "--settings", "gd"])
    assert {r["setting"] for r in rows} == {"gd", "lin"}
    assert torch.load(tmp_path / "out" / "runs" / "gd" / "seed_0" / "outputs.pt")["outputs"].shape == (3, 4, 10)
