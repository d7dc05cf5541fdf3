"""The Fig. 1 study command on tiny sizes: digits end to end with resume, and the CIFAR-10 path on the miniature
archive."""

import json
import math
from pathlib import Path

import pytest

from lightning_lnsgd.examples.cifar_files import write_cifar10_archive
from lightning_lnsgd.examples.studies import fig1

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--epochs", "1", "--hidden", "16", "--seeds", "2", "--taus", "0.2", "--kernel-probe", "2"]


def _results(out: Path) -> dict[tuple[str, int], dict]:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/seed_*/result.json"))]
    return {(r["setting"], r["seed"]): r for r in records}


def test_digits_study_writes_tables_and_figure_and_resumes(tmp_path):
    out = tmp_path / "fig1"
    rows = fig1.main(["--out", str(out), *TINY])
    results = _results(out)
    assert sorted(results) == [(s, k) for s in ("noise_tau=0.2", "sam_rho=0.05", "sgd") for k in (0, 1)]
    for r in results.values():
        m = r["metrics"]
        # The pruning pass at 100 % kept and Lightning's last validation loop score the same network.
        assert m["prune_acc@1"] == pytest.approx(m["test_acc"], abs=1e-6)
        assert m["best_test_acc"] >= m["test_acc"] and 0 <= m["train_acc"] <= 100
        assert m["kernel_distance"] > 0 and m["linearization_gap"] > 0
        assert r["params"]["epochs"] == 1 and r["params"]["hidden"] == [16]
    # Label noise and SAM change the training of the same seed.
    for k in (0, 1):
        sgd = results[("sgd", k)]["metrics"]["test_loss"]
        assert results[("noise_tau=0.2", k)]["metrics"]["test_loss"] != sgd
        assert results[("sam_rho=0.05", k)]["metrics"]["test_loss"] != sgd
    row = next(r for r in rows if r["setting"] == "noise_tau=0.2" and r["metric"] == "test_acc")
    acc = {key: r["metrics"]["test_acc"] for key, r in results.items()}
    diffs = [acc[("noise_tau=0.2", k)] - acc[("sgd", k)] for k in (0, 1)]
    assert row["diff"] == pytest.approx(sum(diffs) / 2)
    md = (out / "summary.md").read_text()
    assert "| sgd | 2 |" in md and "acc @ 2 % kept" in md and "Paired differences against sgd" in md
    assert (out / "summary.csv").exists()
    png = (out / "figure.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) < 150_000
    # Run again: every run is skipped (nothing rewritten), and the same table comes back.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_*/result.json")}
    again = fig1.main(["--out", str(out), *TINY])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    def key(table):
        return [(r["setting"], r["metric"], r["mean"]) for r in table]

    assert key(again) == key(rows)


def test_cifar10_setting_runs_on_the_miniature_archive(tmp_path):
    root = tmp_path / "cifar"
    write_cifar10_archive(root, n_per_batch=4, n_test=8, extract=True)
    out = tmp_path / "fig1_cifar"
    rows = fig1.main([
        "--out", str(out), "--dataset", "cifar10", "--data-dir", str(root), "--epochs", "1", "--width", "0.0625",
        "--seeds", "1", "--taus", "0.1", "--batch-size", "8", "--num-workers", "0", "--accelerator", "cpu",
        "--kernel-probe", "1",
    ])
    results = _results(out)
    assert sorted(results) == [("noise_tau=0.1", 0), ("sam_rho=0.05", 0), ("sgd", 0)]
    params = results[("sgd", 0)]["params"]
    assert (params["dataset"], params["width"], params["batch_size"], params["hidden"]) == ("cifar10", 0.0625, 8, None)
    for r in results.values():
        assert 0 <= r["metrics"]["test_acc"] <= 100 and math.isfinite(r["metrics"]["test_loss"])
    assert {r["setting"] for r in rows} == {"sgd", "noise_tau=0.1", "sam_rho=0.05"}


@pytest.mark.parametrize("bad", [["--taus", "1.5"], ["--rho", "0"], ["--epochs", "0"], ["--dataset", "mnist"]])
def test_bad_arguments_are_refused_in_one_line(bad, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fig1.main(["--out", str(tmp_path), *bad])
    assert len([line for line in capsys.readouterr().err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("study", ["fig1", "fig5"])
@pytest.mark.parametrize("flag", ["--dataset", "--data"])
def test_both_studies_take_both_spellings_of_the_data_switch(study, flag, tmp_path, capsys):
    from lightning_lnsgd.examples.studies import fig5

    main = {"fig1": fig1.main, "fig5": fig5.main}[study]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), flag, "mnist"])
    err = capsys.readouterr().err
    assert "invalid choice: 'mnist'" in err and "cifar10" in err, err
