"""The report command: phase figure from a short run's TensorBoard logs."""

from __future__ import annotations

from pathlib import Path

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
