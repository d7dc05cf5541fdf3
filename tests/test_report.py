"""The report command: phase figure from a short run's TensorBoard logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_lnsgd import cli, report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sgd_clean")
    cli.main([
        "fit", "--config", str(REPO / "configs" / "sgd_clean.yaml"), "--trainer.max_steps", "300",
        "--trainer.log_every_n_steps", "50", "--trainer.default_root_dir", str(root),
    ])
    return root


def _fake_run(root: Path) -> Path:
    """A run with an escape step, written directly (a clean run never escapes)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(root / "lightning_logs" / "version_0")) as w:
        for step in range(0, 1001, 100):
            w.add_scalar("train/loss", 1.0 / (1 + step), step)
            w.add_scalar("test/loss", 2.0 / (1 + step), step)
            w.add_scalar("dynamics/norm_sq_mean", 1 - step / 2000, step)
            w.add_scalar("dynamics/alignment_mean", step / 1000, step)
            w.add_scalar("dynamics/cosine_mean", step / 1100, step)
            w.add_scalar("dynamics/lazy_distance", 0.01 + step / 400, step)
        w.add_scalar("phase/escape_step", 400.0, 400)
    return root


def test_load_scalars_reads_the_run(short_run: Path) -> None:
    scalars = report.load_scalars(short_run)
    assert [s for s, _ in scalars["dynamics/norm_sq_mean"]] == [0, 50, 100, 150, 200, 250, 300]
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]
    assert all(isinstance(v, float) for _, v in scalars["test/loss"])


def test_report_writes_png(short_run: Path, tmp_path: Path) -> None:
    fake = _fake_run(tmp_path / "noisy")
    out = cli.main(["report", str(short_run), str(fake), "--out", str(tmp_path / "fig" / "phase.png"),
                    "--labels", "clean", "noisy"])
    assert out == tmp_path / "fig" / "phase.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert "no TensorBoard event files" in capsys.readouterr().err
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "other")) as w:
        w.add_scalar("val/acc", 0.5, 0)
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "other"), "--out", str(tmp_path / "x.png")])
    assert "its scalar tags: val/acc" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "other"), "--out", str(tmp_path / "x.png"), "--labels", "a", "b"])
    assert "--labels: got 2 labels for 1" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_report_layer_tags(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "run")) as w:
        for step in (0, 10):
            w.add_scalar("dynamics/backbone.fc1/norm_sq_mean", 1.0 - step / 100, step)
            w.add_scalar("dynamics/backbone.fc1/lazy_distance", 0.1 + step, step)
    out = report.main([str(tmp_path / "run"), "--out", str(tmp_path / "l.png"), "--layer", "backbone.fc1"])
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("given, written", [
    ("fig.pdf", "fig.pdf"), ("fig.SVG", "fig.SVG"), ("p4/o9", "p4/o9.png"), ("newdir/", "newdir/phases.png"),
])
def test_report_writes_the_path_it_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str,
                                          written: str) -> None:
    fake = _fake_run(tmp_path / "run")
    out = report.main([str(fake), "--out", f"{tmp_path}/{given}"])
    assert out == tmp_path / written and out.is_file()
    assert capsys.readouterr().out.strip() == f"report: wrote {tmp_path / written}"
    head = out.read_bytes()[:5]
    assert head == {"pdf": b"%PDF-", "png": b"\x89PNG\r"}.get(out.suffix[1:], head)
    if out.suffix.lower() == ".svg":
        assert b"<svg" in out.read_bytes()[:2000]


def test_report_into_an_existing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = _fake_run(tmp_path / "run")
    (tmp_path / "figs").mkdir()
    out = report.main([str(fake), "--out", str(tmp_path / "figs")])
    assert out == tmp_path / "figs" / "phases.png" and out.read_bytes()[:4] == b"\x89PNG"
    assert str(out) in capsys.readouterr().out


def test_report_refuses_an_unknown_extension(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = _fake_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(fake), "--out", str(tmp_path / "x.xyz")])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'xyz' is not an image format" in last and "png" in last and "pdf" in last and "svg" in last
    assert list(tmp_path.glob("x*")) == []


def test_report_layer_without_match_lists_the_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar("train/loss", 1.0, 0)
        for layer in ("fc1", "blocks.0.fc"):
            w.add_scalar(f"dynamics/{layer}/norm_sq_mean", 1.0, 0)
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "run"), "--out", str(tmp_path / "l.png"), "--layer", "nosuch"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--layer 'nosuch' matches no dynamics/nosuch/* tag" in last and "layers in its logs: blocks.0.fc, fc1." in last
    assert not (tmp_path / "l.png").exists()


def test_report_warns_about_a_truncated_event_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = _fake_run(tmp_path / "run")
    (event_file,) = fake.rglob("events.out.tfevents.*")
    assert report.check_event_file(event_file) is None
    data = event_file.read_bytes()
    event_file.write_bytes(data[: len(data) * 2 // 3])  # a run killed while writing
    assert "truncated" in report.check_event_file(event_file)
    with pytest.warns(report.ReportWarning, match="truncated"):
        scalars = report.load_scalars(fake)
    assert 0 < len(scalars["train/loss"]) < 11  # what precedes the cut is still read
    out = report.main([str(fake), "--out", str(tmp_path / "t.png")])
    err = capsys.readouterr().err
    assert out.is_file() and f"warning: report: event file {str(event_file)!r} is truncated" in err


def _fake_sweep(root: Path, layout: str) -> Path:
    """A stacked run of two replicas (σ = 1 and 4, escaping at 900 and 300), steps 0-1000: in the replica-run layout
    ("runs"), written as a run and its resume (version_0: steps 0-500, version_1: 600-1000), or in the earlier layout
    of ``…/r{k}`` tags ("tags")."""
    from torch.utils.tensorboard import SummaryWriter

    replicas = [(1.0, 900), (4.0, 300)]
    if layout == "tags":
        with SummaryWriter(str(root / "lightning_logs" / "version_0")) as w:
            for step in range(0, 1001, 100):
                w.add_scalar("dynamics/norm_sq_mean", 1 - step / 2000, step)
                for k in range(2):
                    w.add_scalar(f"dynamics/norm_sq_mean/r{k}", 1 - step / (1000 * (k + 1)), step)
            for k, (sigma, escape) in enumerate(replicas):
                w.add_scalar(f"replica/sigma/r{k}", sigma, 0)
                w.add_scalar(f"phase/escape_step/r{k}", float(escape), escape)
        return root
    for version, steps in enumerate([range(0, 501, 100), range(600, 1001, 100)]):
        folder = root / "lightning_logs" / f"version_{version}"
        with SummaryWriter(str(folder)) as w:
            for step in steps:
                w.add_scalar("dynamics/norm_sq_mean", 1 - step / 2000, step)
        for k, (sigma, escape) in enumerate(replicas):
            with SummaryWriter(str(folder / f"r{k}-sigma{sigma:g}-seed0")) as w:
                if version == 0:
                    w.add_scalar("replica/sigma", sigma, 0)
                for step in steps:
                    w.add_scalar("dynamics/norm_sq_mean", 1 - step / (1000 * (k + 1)), step)
                if escape in steps:
                    w.add_scalar("phase/escape_step", float(escape), escape)
    return root


@pytest.mark.parametrize("layout", ["runs", "tags"])
def test_report_reads_the_replicas_of_a_stacked_run(tmp_path: Path, layout: str) -> None:
    run = _fake_sweep(tmp_path / "sweep", layout)
    scalars, replicas = report.load_run(run)
    assert list(replicas) == [0, 1] and set(scalars) == {"dynamics/norm_sq_mean"} | (set() if layout == "runs" else {
        f"{t}/r{k}" for k in (0, 1) for t in ("dynamics/norm_sq_mean", "replica/sigma", "phase/escape_step")})
    assert [s for s, _ in replicas[1]["dynamics/norm_sq_mean"]] == list(range(0, 1001, 100))  # both versions
    assert replicas[1]["dynamics/norm_sq_mean"][-1][1] == pytest.approx(0.5)
    assert report.escape_points(replicas, "sigma") == [(1.0, 900.0), (4.0, 300.0)]
    assert [label for label, _ in report.expand_replicas(scalars, "s", replicas)] == ["s r0 (sigma=1)", "s r1 (sigma=4)"]
    assert report.main([str(run), "--escape-vs", "sigma", "--out", str(tmp_path / "e.png")]).stat().st_size > 5000


def _pixels_of(fig, ax, rgb) -> int:
    """How many pixels inside ``ax`` have the colour ``rgb`` (0–255), on the rendered figure."""
    import numpy as np

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    x0, y0, x1, y1 = (int(round(v)) for v in ax.get_window_extent().extents)
    height = image.shape[0]
    patch = image[height - y1:height - y0, x0:x1]  # the canvas counts rows from the top
    return int((np.abs(patch - np.array(rgb)).sum(-1) < 60).sum())


def test_report_draws_one_and_two_point_curves(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgb
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "lightning_logs" / "version_0")) as w:  # the README run at max_steps=50
        w.add_scalar("train/loss", 0.5, 49)
        for step in (0, 50):
            w.add_scalar("dynamics/lazy_distance", 0.1 + step / 100, step)
        for step in range(0, 51, 5):
            w.add_scalar("dynamics/norm_sq_mean", 1 - step / 200, step)
    fig = report.phase_figure([report.load_scalars(tmp_path)], ["run"])
    loss_ax, norm_ax, _, lazy_ax = fig.axes[:4]
    by_points = {len(line.get_xdata()): line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "run"}
    assert set(by_points) == {1, 2, 11}
    assert by_points[1].get_marker() == by_points[2].get_marker() == "o"
    assert by_points[11].get_marker() in (None, "None", "")  # a long curve stays a plain line
    blue = [round(255 * c) for c in to_rgb(by_points[1].get_color())]
    assert _pixels_of(fig, loss_ax, blue) > 10  # the one point is visible on the canvas
    assert _pixels_of(fig, lazy_ax, blue) > 10


def _grid_table(path: Path, censored: set[tuple[float, float]]) -> None:
    """A replicas.csv of a 3 σ × 3 η × 4 seeds grid whose escape steps follow T = 50·σ^-2·η^-1.5 times a factor per
    seed (the same in every cell), with the cells in ``censored`` never escaping."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["replica", "seed", "lr", "init_scale", "sigma", "escape_step", "step", "train/loss"])
        k = 0
        for sigma in (1.0, 2.0, 4.0):
            for lr in (0.01, 0.02, 0.04):
                for seed, factor in enumerate((0.8, 0.9, 1.1, 1.3)):
                    t = -1 if (sigma, lr) in censored else 50 * sigma**-2 * lr**-1.5 * factor
                    w.writerow([k, seed, lr, 1.0, sigma, t, 100000, 0.5])
                    k += 1


def test_phase_diagram_fits_the_grid_exponents_and_marks_censored_cells(tmp_path, capsys):
    _grid_table(tmp_path / "replicas.csv", censored={(1.0, 0.01)})
    out = report.main([str(tmp_path), "--phase-diagram", "sigma", "lr", "--out", str(tmp_path / "pd.png")])
    assert out == tmp_path / "pd.png" and 5_000 < out.stat().st_size < 150_000
    printed = capsys.readouterr().out
    assert "a (sigma) = -2.000" in printed and "b (lr) = -1.500" in printed and "on 32 escaped replicas" in printed
    from lightning_lnsgd.twolayer.replica_table import read_replica_table

    fig, fit = report.phase_diagram_figure(read_replica_table(tmp_path), "sigma", "lr")
    # The seed factors are the same in every cell, so the exponents are exact and the intervals hold them.
    assert fit.a == pytest.approx(-2.0, abs=1e-9) and fit.b == pytest.approx(-1.5, abs=1e-9) and fit.n == 32
    assert fit.a_interval[0] < -2.0 < fit.a_interval[1] and fit.a_interval[1] - fit.a_interval[0] < 0.5
    assert fit(2.0, 0.02) == pytest.approx(50 * 2.0**-2 * 0.02**-1.5 * (0.8 * 0.9 * 1.1 * 1.3) ** 0.25)
    # The censored cell is drawn as a cross at its (σ, η) (X = σ across, Y = η up), and its colour cell is left empty.
    axes = fig.axes[0]
    crosses = [line.get_xydata().tolist() for line in axes.lines if line.get_marker() == "x"]
    assert crosses == [[[1.0, 0.01]]]
    # matplotlib < 3.8 hands the mesh's values back flattened: reshape to the 3 η × 3 σ cells.
    mesh = np.ma.asarray(axes.collections[0].get_array()).reshape(3, 3)
    mask = np.ma.getmaskarray(mesh)
    assert bool(mask[0, 0]) and not bool(mask.ravel()[1:].any())
    assert float(mesh[2, 2]) == pytest.approx(50 * 4.0**-2 * 0.04**-1.5 * (0.8 + 0.9 + 1.1 + 1.3) / 4)


def test_phase_diagram_refusals(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--phase-diagram", "sigma", "lr", "--out", str(tmp_path / "pd.png")])
    assert "needs exactly one replicas.csv" in capsys.readouterr().err
    _grid_table(tmp_path / "replicas.csv", censored=set())
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--phase-diagram", "sigma", "rho", "--out", str(tmp_path / "pd.png")])
    assert "'rho' is not a column of the replica table; it has: seed, lr, init_scale, sigma" in capsys.readouterr().err
