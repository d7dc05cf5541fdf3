"""PruningCurve on real fits with both Lightning packages: the curve, its logs, and that nothing is left changed."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from lightning_lnsgd.callbacks import PruningCurve
from lightning_lnsgd.callbacks.pruning import global_magnitude_masks
from tests.callbacks.user_model import user_classes
from tests.conftest import make_trainer, read_events, read_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _fit(lightning: ModuleType, tmp_path, **trainer_args):
    UserModel, BlobData = user_classes(lightning)
    lightning.seed_everything(0)
    model, data = UserModel(), BlobData()
    pruning = PruningCurve(kept_fractions=[1.0, 0.5, 0.1, 0.0], monitor="val/acc")
    logger = lightning.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = make_trainer(lightning, max_steps=60, logger=logger, callbacks=[pruning], **trainer_args)
    trainer.fit(model, data)
    logger.experiment.flush()
    return trainer, model, data, pruning


def test_curve_is_logged_and_sensible(lightning: ModuleType, tmp_path) -> None:
    trainer, model, data, pruning = _fit(lightning, tmp_path)
    curve = pruning.curve
    assert list(curve) == [1.0, 0.5, 0.1, 0.0]
    # α = 1 is the trained model; the easy task is learnt; α = 0 (all weights zero) predicts one class
    assert curve[1.0] == pytest.approx(_accuracy(model, data.xv, data.yv), abs=1e-6) and curve[1.0] > 0.85
    assert curve[0.0] < 0.75 and curve[0.0] <= curve[0.1] + 0.05
    scalars = read_scalars(trainer.log_dir)
    assert scalars["pruning/val/acc@0.5"] == [(60, pytest.approx(curve[0.5]))]
    assert "pruning/val/acc" in read_events(trainer.log_dir).Tags()["images"]


def test_evaluate_restores_weights_modes_and_metric_state(lightning: ModuleType, tmp_path) -> None:
    trainer, model, data, _ = _fit(lightning, tmp_path)
    model.val_acc.reset()
    model.val_acc.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]))  # a user's half-accumulated metric
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metric_state = {k: v.clone() for k, v in model.val_acc.metric_state.items()}
    model.train()
    modes = []
    step = model.validation_step
    stages = []
    model.validation_step = lambda *a: (modes.append(model.training), stages.append(
        (trainer.validating, trainer.training)), step(*a))[2]
    stage_before = trainer.state.stage
    loss_curve = PruningCurve(kept_fractions=[0.3, 1.0], monitor="val/loss").evaluate(trainer, model)
    del model.validation_step
    assert modes and not any(modes)  # evaluated in eval mode
    assert set(stages) == {(True, False)} and trainer.state.stage == stage_before  # a validating trainer, restored
    assert model.training and model.backbone.fc1.training  # each module back in its own mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit
    assert all(torch.equal(metric_state[k], v) for k, v in model.val_acc.metric_state.items())
    assert float(model.val_acc.compute()) == pytest.approx(2 / 3)
    assert loss_curve[0.3] > loss_curve[1.0] > 0
    with pytest.raises(ValueError, match="monitor='val/nope' was not logged"):
        PruningCurve(monitor="val/nope").evaluate(trainer, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("limit, n", [(1, 64), (0.5, 128)])
def test_respects_limit_val_batches(lightning: ModuleType, tmp_path, limit, n) -> None:
    """The 200 validation examples come in batches of 64: limit 1 → the first 64, limit 0.5 → int(4·0.5) = 2 batches."""
    trainer, model, data, pruning = _fit(lightning, tmp_path, limit_val_batches=limit)
    assert pruning.curve[1.0] == pytest.approx(_accuracy(model, data.xv[:n], data.yv[:n]), abs=1e-6)


def test_end_of_fit_curve_is_taken_before_the_strategy_moves_the_model_to_cpu(lightning: ModuleType) -> None:
    # Lightning's strategy teardown (module.cpu(), at the end of fit) comes before on_fit_end; on a GPU the curve
    # must be taken on the device the model trained on, i.e. before that teardown.
    class RecordingStrategy(lightning.strategies.SingleDeviceStrategy):
        torn_down = False

        def teardown(self) -> None:
            self.torn_down = True
            super().teardown()

    UserModel, BlobData = user_classes(lightning)
    lightning.seed_everything(0)
    model, data = UserModel(), BlobData()
    strategy = RecordingStrategy(device=torch.device("cpu"))
    seen: list[bool] = []
    step = model.validation_step
    model.validation_step = lambda *a: (seen.append(strategy.torn_down), step(*a))[1]
    pruning = PruningCurve(kept_fractions=[1.0, 0.5], monitor="val/acc")
    make_trainer(lightning, max_steps=5, strategy=strategy, callbacks=[pruning]).fit(model, data)
    assert list(pruning.curve) == [1.0, 0.5]
    assert seen and strategy.torn_down and not any(seen)


def test_global_magnitude_masks_keep_the_largest_entries_overall() -> None:
    a, b = torch.tensor([[0.1, -5.0], [2.0, 0.0]]), torch.tensor([3.0, -0.2, 1.0])
    masks = global_magnitude_masks([a, b], 3 / 7)  # round(3/7 · 7) = 3 largest |w| of both: 5, 3, 2
    assert torch.equal(masks[0], torch.tensor([[False, True], [True, False]]))
    assert torch.equal(masks[1], torch.tensor([True, False, False]))
    assert not any(m.any() for m in global_magnitude_masks([a, b], 0.0))


def test_refusals(lightning: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"kept_fractions=\[1.5\] must be a non-empty list"):
        PruningCurve(kept_fractions=[1.5])
    with pytest.raises(ValueError, match=r"every_n_validations=0 must be an integer"):
        PruningCurve(every_n_validations=0)
    UserModel, BlobData = user_classes(lightning)
    trainer = make_trainer(lightning, max_steps=1, callbacks=[PruningCurve(parameters=["nope"])])
    with pytest.raises(ValueError, match="'nope' matches no layer"):
        trainer.fit(UserModel(), BlobData())
