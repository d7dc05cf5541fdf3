"""Lemma 4's oscillation-only model: the chain, the GD on W, the shrinking."""

import math

import pytest
import torch

from lightning_lnsgd import OscillationOnly, SparseTeacherDataModule
from lightning_lnsgd.twolayer import functional as F
from lightning_lnsgd.twolayer.oscillation import markov_step
from tests.conftest import make_trainer


def test_markov_chain_transitions():
    level = 0.3
    a = torch.tensor([level, -level, 0.0, 0.0])
    u = torch.tensor([0.9, 0.1, 0.2, 0.7])
    assert markov_step(a, level, u).tolist() == pytest.approx([0.0, 0.0, level, -level])


def test_initial_chain_distribution_and_default_width():
    model = OscillationOnly(dim=5, lr=1e-4, seed=1)
    assert model.W.shape == (100, 5)  # m = 1/√η
    a = model.a
    level = 1e-4**0.25
    assert all(v == 0.0 or v == pytest.approx(level) for v in a.abs().unique().tolist())
    # ½ at 0, ¼ at each sign: loose binomial bounds for m = 100
    assert 30 <= int((a == 0).sum()) <= 70 and 10 <= int((a > 0).sum()) <= 40


def test_gd_on_W_with_chain_matches_reference_and_shrinks_norms(tmp_path):
    lr, steps = 0.01, 3000
    model = OscillationOnly(dim=20, lr=lr, seed=0, steps_per_batch=500)
    W, a = model.W.detach().clone(), model.a.detach().clone()
    dm = SparseTeacherDataModule(steps_per_epoch=10)
    trainer = make_trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == steps
    # Independent replay: full-batch GD on W, the chain from the same stream.
    chain = OscillationOnly(dim=20, lr=lr, seed=0)._chain
    u = chain.uniform(a.shape, n=steps, dtype=torch.float64)
    for t in range(steps):
        gW, _, _ = F.grads(W, a, dm.x_train, dm.y_train)
        W = W - lr * gW
        a = markov_step(a, lr**0.25, u[t])
    torch.testing.assert_close(model.W.detach(), W, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.a.detach(), a)
    assert model.W.detach().square().sum(-1).mean() < math.sqrt(lr)  # Lemma 4's bound, reached early
