"""CIFAR-10 data (files, download, checksum, augmentation), ResNet-18, ImageClassifier with the plug-ins, digits."""

import functools
import http.server
import pickle
import threading
from pathlib import Path

import pytest
import torch

from lightning_lnsgd.callbacks import DynamicsMonitor, PruningCurve
from lightning_lnsgd.callbacks.label_noise import LabelNoise
from lightning_lnsgd.cli import main
from lightning_lnsgd.compat import Callback
from lightning_lnsgd.examples.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    random_crop_flip,
)
from lightning_lnsgd.examples.cifar_files import write_cifar10_archive
from lightning_lnsgd.examples.resnet import ResNet18
from lightning_lnsgd.examples.vision import ImageClassifier
from lightning_lnsgd.nn import Linearized
from lightning_lnsgd.strategies.sam import SAMStrategy
from tests.conftest import make_trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAST = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A miniature CIFAR-10 (5 × 4 training images, 8 test images) extracted in the official layout."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_archive(root, n_per_batch=4, n_test=8, extract=True)
    return root


@pytest.fixture
def http_dir(tmp_path):
    """Serves a directory on 127.0.0.1 at a free port; yields (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _trainer(tmp_path, **kw):
    return make_trainer(**{"max_steps": 3, "limit_val_batches": 1, "default_root_dir": str(tmp_path), **kw})


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
def test_download_extract_and_load_from_local_http_server(http_dir, tmp_path):
    served, base = http_dir
    _, md5 = write_cifar10_archive(served, n_per_batch=3, n_test=5, seed=1)
    data_dir = tmp_path / "data"
    dm = CIFAR10DataModule(data_dir=str(data_dir), download=True, url=f"{base}/cifar-10-python.tar.gz", md5=md5,
                           batch_size=4, augment=False, num_workers=0)
    dm.prepare_data()
    assert (data_dir / "cifar-10-batches-py" / "test_batch").is_file()
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5
    # the loaded images are the archive's, normalised per channel
    with open(data_dir / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x, y = dm.train_set[3]  # first image of data_batch_2
    expect = torch.as_tensor(raw[b"data"][0], dtype=torch.float32).reshape(3, 32, 32) / 255
    expect = (expect - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(x, expect)
    assert y.item() == raw[b"labels"][0]
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    # a second prepare_data finds the files and does nothing (no server needed)
    CIFAR10DataModule(data_dir=str(data_dir), download=True, url="http://127.0.0.1:9/none", md5=md5).prepare_data()


def test_wrong_checksum_is_refused(http_dir, tmp_path):
    served, base = http_dir
    write_cifar10_archive(served)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "d"), download=True, url=f"{base}/cifar-10-python.tar.gz",
                           num_workers=0)  # default md5 = the official archive's: the miniature does not match
    with pytest.raises(RuntimeError, match=r"checksum mismatch.*expected c58f30108f718f92721af3b95e74349a"):
        dm.prepare_data()
    assert not (tmp_path / "d" / "cifar-10-batches-py").exists()
    assert not (tmp_path / "d" / "cifar-10-python.tar.gz").exists()  # moved aside as .bad


def test_missing_files_error_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.delenv("LNSGD_DATA_DIR", raising=False)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar-10-batches-py.*data_batch_1.*download: true.*LNSGD_DATA_DIR"):
        dm.setup("fit")


def test_data_dir_from_environment_subset_and_val_subset(cifar_root, monkeypatch):
    monkeypatch.setenv("LNSGD_DATA_DIR", str(cifar_root))
    dm = CIFAR10DataModule(subset=7, val_subset=3, num_workers=0)
    dm.setup("fit")
    assert dm.data_dir == Path(cifar_root)
    assert len(dm.train_set) == 7 and len(dm.val_set) == 3
    assert dm.num_classes == 10


def test_random_crop_flip_matches_per_image_reference():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 7)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    gen = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, padding=2, flip=True, generator=gen)
    gen = torch.Generator().manual_seed(3)  # replay the draws: oy, ox, flip mask
    oy = torch.randint(0, 5, (6,), generator=gen)
    ox = torch.randint(0, 5, (6,), generator=gen)
    flip = torch.rand(6, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, oy[i]:oy[i] + 5, ox[i]:ox[i] + 7]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


# ------------------------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------------------------
def test_resnet18_architecture():
    full = ResNet18()
    assert sum(p.numel() for p in full.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    assert full.conv1.kernel_size == (3, 3) and full.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in full.modules())
    small = ResNet18(num_classes=7, in_channels=1, width=0.125)
    assert small.widths == [8, 16, 32, 64]
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 7)


class _CheckMetricUpdates(Callback):
    """train_acc must be updated once per optimizer step, also under SAM (two training_step calls)."""

    def __init__(self):
        self.counts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append((batch_idx + 1, pl_module.train_acc.update_count))


@pytest.mark.parametrize("strategy", ["auto", "sam"])
def test_image_classifier_with_label_noise_dynamics_pruning(cifar_root, tmp_path, strategy):
    dm = CIFAR10DataModule(data_dir=str(cifar_root), batch_size=4, num_workers=0)
    model = ImageClassifier(backbone="resnet18", width=0.125, schedule="cosine")
    check = _CheckMetricUpdates()
    noise = LabelNoise(kind="flip", flip_prob=0.5, seed=1)
    prune = PruningCurve(kept_fractions=[1.0, 0.1])
    dyn = DynamicsMonitor(layers=["backbone.conv1", "backbone.layer4.1.conv2", "backbone.fc"], every_n_steps=1)
    strat = SAMStrategy(rho=0.05) if strategy == "sam" else "auto"
    trainer = _trainer(tmp_path, strategy=strat, callbacks=[noise, dyn, prune, check], max_steps=4,
                       limit_train_batches=4)
    trainer.fit(model, dm)
    assert trainer.global_step == 4
    assert model.num_classes == 10 and model.hparams.num_classes == 10 and model.input_shape == [3, 32, 32]
    assert noise.num_classes == 10 and noise.counter == 4  # one draw per training step; pruned evaluations draw none
    assert all(seen == expected for expected, seen in check.counts), check.counts
    assert set(prune.curve) == {1.0, 0.1}
    for key in ("val/acc", "val/loss", "train/loss", "train/acc"):
        assert key in trainer.callback_metrics
    # cosine schedule: lr decays over estimated_stepping_batches
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.1


def test_pruning_curve_at_fit_end_sees_clean_labels(cifar_root, tmp_path):
    dm = CIFAR10DataModule(data_dir=str(cifar_root), batch_size=4, num_workers=0)
    model = ImageClassifier(backbone="mlp", hidden=[8], lr=1e-9)  # does not move: the pruning pass must agree
    noise = LabelNoise(kind="flip", flip_prob=1.0, seed=1)
    prune = PruningCurve(kept_fractions=[1.0])
    trainer = _trainer(tmp_path, callbacks=[noise, prune], max_steps=2, limit_val_batches=None)
    trainer.fit(model, dm)
    assert noise.counter == 2
    clean = trainer.validate(model, dm, verbose=False)[0]["val/acc"]
    assert prune.curve[1.0] == pytest.approx(clean)


def test_image_classifier_mlp_and_module_backbones():
    m = ImageClassifier(backbone="mlp", num_classes=4, input_shape=[1, 8, 8], hidden=[16, 8])
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 4)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    m = ImageClassifier(backbone=net, num_classes=3)
    assert m.backbone is net and "backbone" not in m.hparams
    with pytest.raises(ValueError, match="unknown `backbone`"):
        ImageClassifier(backbone="vgg")
    with pytest.raises(ValueError, match="milestones"):
        ImageClassifier(schedule="step")


def test_ntk_mlp_tanh_mse_and_argument_checks():
    torch.manual_seed(0)
    m = ImageClassifier(backbone="mlp", num_classes=3, input_shape=[1, 4, 4], hidden=[4096], activation="tanh",
                        parameterization="ntk", loss="mse")
    first, head = m.backbone.layers[0], m.backbone.fc
    assert isinstance(m.backbone.layers[1], torch.nn.Tanh)
    assert abs(first.weight.std().item() - 1) < 0.02 and abs(first.weight.mean().item()) < 0.02  # N(0, 1)
    x = torch.randn(5, 1, 4, 4)
    h = torch.tanh(x.flatten(1) @ first.weight.T / 16**0.5 + 0.1 * first.bias)  # 1/sqrt(fan_in), beta = 0.1
    expected = h @ head.weight.T / 4096**0.5 + 0.1 * head.bias
    torch.testing.assert_close(m(x), expected)
    y = torch.tensor([0, 2, 1, 1, 0])
    loss = 0.5 * ((expected - torch.eye(3)[y]) ** 2).sum() / 5  # on one-hot targets, summed over classes
    torch.testing.assert_close(m.loss(m(x), y), loss)
    for kwargs, match in [
        (dict(activation="gelu"), "activation='gelu' must be one of"),
        (dict(parameterization="mup"), "parameterization='mup' must be 'standard' or 'ntk'"),
        (dict(backbone="resnet18", parameterization="ntk"), "apply to backbone='mlp' only"),
        (dict(loss="hinge"), "loss='hinge' must be 'cross_entropy' or 'mse'"),
        (dict(linearize="yes"), "linearize='yes' must be true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            ImageClassifier(**{"backbone": "mlp", **kwargs})


def test_linearize_wraps_the_backbone_keeping_its_names():
    torch.manual_seed(1)
    plain = ImageClassifier(backbone="mlp", num_classes=3, input_shape=[1, 4, 4], hidden=[8])
    torch.manual_seed(1)
    lin = ImageClassifier(backbone="mlp", num_classes=3, input_shape=[1, 4, 4], hidden=[8], linearize=True)
    assert isinstance(lin.backbone, Linearized)
    assert [n for n, _ in lin.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randn(4, 1, 4, 4)
    torch.testing.assert_close(lin(x), plain(x))  # equal at θ₀
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    assert isinstance(ImageClassifier(backbone=Linearized(net), num_classes=3).backbone, Linearized)


def test_linearized_ntk_mlp_from_yaml(tmp_path):
    pytest.importorskip("sklearn")
    config = tmp_path / "lin.yaml"
    config.write_text(
        "model:\n  class_path: lightning_lnsgd.ImageClassifier\n  init_args:\n    backbone: mlp\n    hidden: [32]\n"
        "    activation: tanh\n    parameterization: ntk\n    linearize: true\n    loss: mse\n    lr: 1.0\n"
        "data:\n  class_path: lightning_lnsgd.DigitsDataModule\n  init_args:\n    batch_size: 64\n"
    )
    cli = main(["fit", "--config", str(config), *FAST, "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 3 and isinstance(cli.model.backbone, Linearized)
    theta0, moved = cli.model.backbone.parameters0(), dict(cli.model.backbone.named_parameters())
    assert not torch.equal(theta0["fc.weight"], moved["fc.weight"])  # trained, θ₀ kept


def test_step_schedule_and_momentum():
    m = ImageClassifier(backbone="mlp", num_classes=3, input_shape=[1, 2, 2], momentum=0.9, weight_decay=5e-4,
                        nesterov=True, schedule="step", milestones=[2], gamma=0.5)
    conf = m.configure_optimizers()
    opt = conf["optimizer"]
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 5e-4
    assert conf["lr_scheduler"]["interval"] == "epoch"


# ------------------------------------------------------------------------------------------------------------------
# Configs and the digits example
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10_resnet18_label_noise.yaml", "cifar10_resnet18_sam.yaml"])
def test_cifar_configs_run_on_miniature_data(name, cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LNSGD_DATA_DIR", str(cifar_root))
    cli = main(["fit", "--config", str(CONFIGS / name), *FAST, "--trainer.default_root_dir", str(tmp_path),
                "--model.width", "0.125", "--data.num_workers", "0"])
    assert cli.trainer.global_step == 3
    assert cli.model.hparams.num_classes == 10
    assert list(tmp_path.glob("**/events.out.tfevents*"))


def test_cifar_configs_follow_figure_1():
    import yaml

    for name in ("sgd", "label_noise", "sam"):
        cfg = yaml.safe_load((CONFIGS / f"cifar10_resnet18_{name}.yaml").read_text())
        m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
        assert (m["lr"], m["momentum"], m["weight_decay"], d["batch_size"], t["max_epochs"]) == (0.1, 0.0, 0.0, 128, 160)
        kinds = {c["class_path"].rsplit(".", 1)[1] for c in t["callbacks"]}
        assert {"PruningCurve", "DynamicsMonitor"} <= kinds
    text = (CONFIGS / "cifar10_resnet18_label_noise.yaml").read_text()
    assert all(v in text.split("seed_everything")[0] for v in ("0.05", "0.1", "0.2"))


def test_digits_datamodule():
    pytest.importorskip("sklearn")
    from lightning_lnsgd.examples.vision import DigitsDataModule

    dm = DigitsDataModule(n_val=97, batch_size=32, augment=True)
    dm.setup("fit")
    assert len(dm.train_set) == 1700 and len(dm.val_set) == 97
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,) and int(y.max()) <= 9
    xs = torch.cat([b[0] for b in dm.val_dataloader()])
    assert abs(float(xs.mean())) < 0.2 and 0.8 < float(xs.std()) < 1.2  # normalised with the train statistics


def test_digits_config_runs(tmp_path):
    pytest.importorskip("sklearn")
    cli = main(["fit", "--config", str(CONFIGS / "digits_label_noise.yaml"), *FAST,
                "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 3
    assert cli.model.input_shape == [1, 8, 8] and cli.model.num_classes == 10
    lazy = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Laziness")
    assert lazy.probe.shape == (64, 1, 8, 8) and lazy.last  # step 0 evaluated and logged
