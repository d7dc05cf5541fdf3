"""``predict`` on TwoLayerLinear: the predictions on the test inputs, returned and written by PredictionWriter."""

import torch

from lightning_lnsgd import SparseTeacherDataModule, TwoLayerLinear
from lightning_lnsgd.callbacks.predictions import PredictionWriter
from tests.conftest import make_trainer


def test_predict_writes_the_test_predictions(tmp_path):
    model = TwoLayerLinear(dim=5, width=8, seed=3, replicas=2, steps_per_batch=4)
    dm = SparseTeacherDataModule(dim=5, n_train=10, n_test=7)
    trainer = make_trainer(logger=False, default_root_dir=tmp_path, callbacks=[PredictionWriter()])
    returned = trainer.predict(model, dm)
    written = torch.load(tmp_path / "predictions.pt")
    dm.setup("predict")
    expected = torch.einsum("km,kmd,nd->kn", model.a, model.W, dm.x_test)  # ŷ = aᵀWx per replica, computed apart
    assert len(written) == len(returned) == 1 and torch.equal(written[0], returned[0])
    assert written[0].shape == (2, 7)
    torch.testing.assert_close(written[0], expected.detach())


def test_prediction_writer_path_and_rerun(tmp_path):
    model = TwoLayerLinear(dim=3, width=4)
    dm = SparseTeacherDataModule(dim=3, n_train=5, n_test=4)
    writer = PredictionWriter(tmp_path / "out" / "p.pt")
    trainer = make_trainer(logger=False, default_root_dir=tmp_path, callbacks=[writer])
    trainer.predict(model, dm)
    trainer.predict(model, dm)  # a second run replaces the file, it does not append
    written = torch.load(tmp_path / "out" / "p.pt")
    assert len(written) == 1 and written[0].shape == (4,)
