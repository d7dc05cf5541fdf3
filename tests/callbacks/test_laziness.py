"""Function-space laziness: linearisation gap and NTK kernel distance (formulas, exact lazy limit, callback, models
called other than ``module(x)``)."""

import copy
import importlib
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from lightning_lnsgd import compat
from lightning_lnsgd.callbacks.laziness import (
    Laziness,
    empirical_ntk,
    kernel_distance,
    linearization_gap,
)
from lightning_lnsgd.examples.resnet import ResNet18
from lightning_lnsgd.metrics.functional.laziness import (
    concat_examples,
    first_examples,
    num_examples,
)
from tests.conftest import make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _perturb(model, scale, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _explicit_jacobian(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    rows = x.shape[0] * model(x).shape[1]
    return torch.cat([jac[n].reshape(rows, -1) for n in params], dim=1).double()


def test_linear_model_is_exactly_lazy():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x = torch.randn(9, 6)
    p0, K0 = _snapshot(model), empirical_ntk(model, x)
    _perturb(model, 1.0)  # a large move: a linear model stays equal to its linearisation
    assert float(linearization_gap(model, p0, x)) < 1e-5
    assert float(kernel_distance(K0, empirical_ntk(model, x))) < 1e-6


def test_moving_network_is_not_lazy_and_formulas_match_explicit_jacobian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(6, 5)
    p0 = _snapshot(model)
    assert float(linearization_gap(model, p0, x)) == 0.0  # nothing moved: 0/0 := 0
    J0 = _explicit_jacobian(model, x)
    K0 = empirical_ntk(model, x)
    torch.testing.assert_close(K0, J0 @ J0.T, rtol=1e-5, atol=1e-5)
    _perturb(model, 0.3)
    delta = torch.cat([(p.detach() - p0[n]).flatten() for n, p in model.named_parameters()]).double()
    f0 = functional_call(model, p0, (x,)).double().flatten()
    ft = model(x).double().flatten()
    expect = (ft - f0 - J0 @ delta).norm() / (ft - f0).norm()
    gap = linearization_gap(model, p0, x)
    assert float(gap) > 0.05
    torch.testing.assert_close(gap, expect, rtol=1e-4, atol=1e-6)
    Kt = empirical_ntk(model, x)
    Jt = _explicit_jacobian(model, x)
    torch.testing.assert_close(Kt, Jt @ Jt.T, rtol=1e-5, atol=1e-5)
    expect_kd = 1 - (K0 * Kt).sum() / (K0.norm() * Kt.norm())
    torch.testing.assert_close(kernel_distance(K0, Kt), expect_kd, rtol=1e-6, atol=1e-9)
    assert float(expect_kd) > 1e-3


def test_batch_norm_network_is_evaluated_in_eval_mode():
    torch.manual_seed(0)
    net = ResNet18(num_classes=3, in_channels=1, width=0.0625)
    net.train()
    with torch.no_grad():  # give the running statistics some non-default values
        net(torch.randn(16, 1, 8, 8) * 2 + 1)
    stats = {n: b.clone() for n, b in net.named_buffers()}
    x = torch.randn(4, 1, 8, 8)
    p0 = _snapshot(net)
    K = empirical_ntk(net, x)
    assert K.shape == (12, 12)
    _perturb(net, 0.05)
    gap = linearization_gap(net, p0, x)
    assert 0 < float(gap) < 10
    assert net.training  # mode restored
    assert all(torch.equal(b, stats[n]) for n, b in net.named_buffers())  # eval mode: no running-stat update
    # per-example kernel in eval mode == kernel of the batched eval-mode forward
    net.eval()
    J = _explicit_jacobian(net, x)
    torch.testing.assert_close(empirical_ntk(net, x), J @ J.T, rtol=1e-4, atol=1e-4)


def _classes(lightning: ModuleType) -> tuple[type, type]:
    """A logger that records ``log_metrics`` rows and a small regressor, of ``lightning``'s package."""

    class Recorder(lightning.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "rec"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class Regressor(lightning.LightningModule):
        def __init__(self, net, lr):
            super().__init__()
            self.net, self.lr = net, lr

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return Recorder, Regressor


def test_callback_logs_at_global_step_zero_for_linear_and_positive_for_mlp(lightning, tmp_path):
    torch.manual_seed(0)
    cb = Laziness(probe_size=20, kernel_probe_size=5, every_n_steps=2)
    rec_lin = _fit_with(lightning, nn.Linear(4, 2), tmp_path, 0.5, cb)
    assert sorted(rec_lin) == [0, 2, 4, 6]
    # the probe is the first 20 inputs of the validation loader given to fit (not the training data)
    assert torch.equal(cb.probe, _data(1)[0][:20])
    for step, m in rec_lin.items():
        assert m["laziness/linearization_gap"] < 1e-4 and m["laziness/kernel_distance"] < 1e-6, (step, m)
    cb2 = Laziness(probe_size=16, kernel_probe_size=4, every_n_steps=3)
    rec_mlp = _fit_with(lightning, nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2)), tmp_path, 2.0, cb2)
    assert sorted(rec_mlp) == [0, 3, 6]
    assert rec_mlp[0]["laziness/linearization_gap"] == 0 and rec_mlp[0]["laziness/kernel_distance"] < 1e-6
    assert rec_mlp[6]["laziness/linearization_gap"] > 1e-3 and rec_mlp[6]["laziness/kernel_distance"] > 1e-4
    state = cb2.state_dict()
    assert set(state["params0"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    fresh = Laziness()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.probe, cb2.probe.cpu())


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g)


def _fit_with(lightning, net, tmp_path, lr, cb):
    Recorder, Regressor = _classes(lightning)
    torch.manual_seed(0)
    train = DataLoader(TensorDataset(*_data(0)), batch_size=16)
    val = DataLoader(TensorDataset(*_data(1)), batch_size=16)
    rec = Recorder()
    trainer = make_trainer(lightning, max_steps=6, logger=rec, limit_val_batches=1, callbacks=[cb],
                           default_root_dir=str(tmp_path))
    trainer.fit(Regressor(net, lr), train, val)
    return {step: m for step, m in rec.rows if any(k.startswith("laziness/") for k in m)}


def test_initial_buffers_mode_and_argument_checks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    cb = Laziness(probe=torch.randn(5, 3), kernel_probe_size=3, buffers="initial")
    cb._params0 = _snapshot(net)
    cb._buffers0 = {n: b.clone() for n, b in net.named_buffers()}
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 3) * 3)  # running statistics move, parameters do not
    # "initial": f(θ₀, B_t) ≠ f(θ₀, B₀) although θ_t = θ₀ and J·0 = 0: the whole move is unexplained, gap = 1
    out = cb.compute(net)
    assert float(out["linearization_gap"]) == pytest.approx(1.0)
    assert float(out["kernel_distance"]) > 0
    # "current" (default): only parameter changes count; none happened
    current = Laziness(probe=cb.probe, kernel_probe_size=3)
    current._params0, current._buffers0 = cb._params0, cb._buffers0
    assert float(current.compute(net)["linearization_gap"]) == 0.0
    assert float(current.compute(net)["kernel_distance"]) < 1e-6
    with pytest.raises(ValueError, match=r"buffers='both' must be 'current' or 'initial'"):
        Laziness(buffers="both")
    with pytest.raises(ValueError, match=r"probe_size=0 must be an integer >= 1"):
        Laziness(probe_size=0)


# -- forward=: models called other than module(x) ---------------------------------------------------------------------
def _demos(package: ModuleType = compat.pl) -> tuple[ModuleType, ModuleType]:
    """The ``demos.transformer`` and ``demos.lstm`` modules of a Lightning package."""
    return tuple(importlib.import_module(f"{package.__name__}.demos.{name}") for name in ("transformer", "lstm"))


def _tiny_transformer(package: ModuleType = compat.pl) -> nn.Module:
    return _demos(package)[0].Transformer(vocab_size=5, ninp=8, nhead=2, nhid=16, nlayers=1, dropout=0.0)


def _tiny_lstm(package: ModuleType = compat.pl) -> nn.Module:
    return _demos(package)[1].SimpleLSTM(vocab_size=5, ninp=8, nhid=8, nlayers=1, dropout=0.0)


def _tokens(seed: int, n: int = 8, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, (n, t), generator=g), torch.randint(5, (n, t), generator=g)


def _two_inputs(m, b):
    return m(b[0], b[1])


def _lstm_log_probs(m, b):
    return m.model(b[0], m.model.init_hidden(b[0].shape[0]))[0]


def _autograd_jacobian(model: nn.Module, call, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, J): the flattened output of ``call(model, batch)`` in eval mode and its Jacobian w.r.t. the trainable
    parameters, one ``torch.autograd.grad`` per output (no torch.func), float64."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    out = call(model, batch).reshape(-1)
    rows = []
    for o in out:
        grads = torch.autograd.grad(o, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return out.detach().double(), torch.stack(rows).double()


def _expected_laziness(model0: nn.Module, model: nn.Module, call, probe, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearisation gap and kernel distance from two explicit Jacobians (θ₀: ``model0``, θ_t: ``model``), with the
    first ``k`` examples of the batch-first probe as kernel probe (output rows are example-major)."""
    f0, J0 = _autograd_jacobian(model0, call, probe)
    ft, Jt = _autograd_jacobian(model, call, probe)
    delta = torch.cat([(p - p0).detach().reshape(-1) for p, p0 in zip(model.parameters(), model0.parameters())])
    gap = (ft - f0 - J0 @ delta.double()).norm() / (ft - f0).norm()
    rows = k * f0.numel() // probe[0].shape[0]
    K0, Kt = J0[:rows] @ J0[:rows].T, Jt[:rows] @ Jt[:rows].T
    return gap, 1 - (K0 * Kt).sum() / (K0.norm() * Kt.norm())


def test_two_input_transformer_forward_matches_autograd_jacobian():
    torch.manual_seed(0)
    model = _tiny_transformer()
    batch = _tokens(0, n=3)
    model0 = copy.deepcopy(model)
    f0, J0 = _autograd_jacobian(model0, _two_inputs, batch)
    K = empirical_ntk(model, batch, forward=_two_inputs)
    assert K.shape == (3 * 4 * 5, 3 * 4 * 5)  # 3 examples × 4 tokens × 5 log-probabilities
    torch.testing.assert_close(K, J0 @ J0.T, rtol=1e-4, atol=1e-5)
    # one example at a time (no vmap over examples) gives the same kernel
    torch.testing.assert_close(empirical_ntk(model, batch, chunk_size=1, forward=_two_inputs), K, rtol=1e-4, atol=1e-5)
    p0 = _snapshot(model)
    assert float(linearization_gap(model, p0, batch, forward=_two_inputs)) == 0.0
    _perturb(model, 0.1)
    gap = linearization_gap(model, p0, batch, forward=_two_inputs)
    expect, _ = _expected_laziness(model0, model, _two_inputs, batch, 1)
    assert float(gap) > 0.01
    torch.testing.assert_close(gap, expect, rtol=1e-3, atol=1e-6)
    assert torch.backends.mha.get_fastpath_enabled()  # the math kernels were selected only while measuring


def test_recurrent_model_needs_one_example_at_a_time_and_a_tensor_output():
    torch.manual_seed(0)
    lstm = _tiny_lstm()
    batch = _tokens(1, n=2)

    def with_state(m, b):  # SimpleLSTM returns (log_probs, hidden)
        return m(b[0], m.init_hidden(b[0].shape[0]))

    with pytest.raises(TypeError, match=r"forward\(model, batch\) returned a tuple, not a tensor"):
        linearization_gap(lstm, _snapshot(lstm), batch, forward=with_state)
    log_probs = lambda m, b: with_state(m, b)[0]  # noqa: E731
    with pytest.raises(RuntimeError, match=r"chunk_size=1 computes the Jacobian one example at a time"):
        empirical_ntk(lstm, batch, forward=log_probs)
    _, J = _autograd_jacobian(lstm, log_probs, batch)
    torch.testing.assert_close(empirical_ntk(lstm, batch, chunk_size=1, forward=log_probs), J @ J.T, rtol=1e-4, atol=1e-5)
    assert torch.backends.mkldnn.enabled  # oneDNN back on after the measurement


def test_probe_batches_are_split_by_examples():
    batch = {"tokens": torch.arange(12).reshape(4, 3), "scale": torch.tensor(2.0), "name": "probe"}
    assert num_examples(batch) == 4
    head = first_examples(batch, 3)
    assert torch.equal(head["tokens"], batch["tokens"][:3]) and head["scale"] is batch["scale"] and head["name"] == "probe"
    both = concat_examples([first_examples(batch, 1), head])
    assert torch.equal(both["tokens"], torch.cat([batch["tokens"][:1], batch["tokens"][:3]]))
    with pytest.raises(ValueError, match=r"tensors with \[3, 4\] rows"):
        num_examples((torch.zeros(3, 2), torch.zeros(4)))


def test_callback_on_demo_lstm_without_forward_of_its_own(lightning, tmp_path):
    torch.manual_seed(0)
    _, lstm_demo = _demos(lightning)

    class OfflineLSTM(lstm_demo.LightningLSTM):
        def prepare_data(self):  # the demo's downloads WikiText2; the test brings its own tokens
            pass

    model = OfflineLSTM(vocab_size=5)
    model.model = _tiny_lstm(lightning)  # the demo's language model, small
    model0 = copy.deepcopy(model)
    inputs, targets = _tokens(2)
    probe = (inputs[:4], targets[:4])
    cb = Laziness(probe=probe, kernel_probe_size=2, every_n_steps=3, forward=_lstm_log_probs, chunk_size=1)
    trainer = make_trainer(lightning, max_steps=3, callbacks=[cb], gradient_clip_val=0.05, default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(TensorDataset(inputs, targets), batch_size=4, drop_last=True))
    gap, kd = _expected_laziness(model0, model, _lstm_log_probs, probe, 2)
    assert cb.last["laziness/linearization_gap"] > 0.05 and cb.last["laziness/kernel_distance"] > 0.01
    assert cb.last["laziness/linearization_gap"] == pytest.approx(float(gap), rel=1e-4)
    assert cb.last["laziness/kernel_distance"] == pytest.approx(float(kd), rel=1e-4)


def _language_model(lightning: ModuleType) -> type:
    class TwoInputLM(lightning.LightningModule):
        """The demo Transformer (``forward(inputs, target)``) trained on next-token log-probabilities."""

        def __init__(self):
            super().__init__()
            self.model = _tiny_transformer(lightning)

        def log_probs(self, batch):
            return self.model(batch[0], batch[1])

        def training_step(self, batch, batch_idx):
            return F.nll_loss(self.log_probs(batch), batch[1].reshape(-1))

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return TwoInputLM


def test_callback_calls_a_named_method_on_whole_validation_batches(lightning, tmp_path):
    torch.manual_seed(0)
    model = _language_model(lightning)()
    model0 = copy.deepcopy(model)
    train, val = TensorDataset(*_tokens(3)), TensorDataset(*_tokens(4))
    cb = Laziness(forward="log_probs", probe_size=6, kernel_probe_size=2, every_n_steps=2)
    trainer = make_trainer(lightning, max_steps=2, limit_val_batches=2, callbacks=[cb], default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(train, batch_size=4), DataLoader(val, batch_size=4))
    # the probe: the first 6 examples of the validation set, whole (inputs, target) batches, across two loader batches
    assert all(torch.equal(p, t[:6]) for p, t in zip(cb.probe, val.tensors))
    gap, kd = _expected_laziness(model0.model, model.model, _two_inputs, cb.probe, 2)
    assert cb.last["laziness/linearization_gap"] > 0.05 and cb.last["laziness/kernel_distance"] > 0.01
    assert cb.last["laziness/linearization_gap"] == pytest.approx(float(gap), rel=1e-4)
    assert cb.last["laziness/kernel_distance"] == pytest.approx(float(kd), rel=1e-4)
    with pytest.raises(ValueError, match=r"forward='logits' is not a method of TwoInputLM"):
        make_trainer(lightning, max_steps=1, callbacks=[Laziness(forward="logits")]).fit(model, DataLoader(train), DataLoader(val))


def test_default_forward_is_module_of_batch_inputs(lightning, tmp_path):
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    rec_default = _fit_with(lightning, copy.deepcopy(net), tmp_path, 1.0, Laziness(probe_size=16, kernel_probe_size=3, every_n_steps=3))
    explicit = Laziness(probe_size=16, kernel_probe_size=3, every_n_steps=3, forward=lambda m, b: m(b[0]))
    rec_explicit = _fit_with(lightning, copy.deepcopy(net), tmp_path, 1.0, explicit)
    assert sorted(rec_default) == sorted(rec_explicit) == [0, 3, 6]
    assert rec_default[6]["laziness/linearization_gap"] > 1e-3
    for step, m in rec_default.items():
        for tag, value in m.items():
            if tag.startswith("laziness/"):
                assert rec_explicit[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, tag)


@pytest.mark.parametrize("forward", [3, ""])
def test_forward_argument_check(forward):
    with pytest.raises(ValueError, match=rf"forward={forward!r} must be a callable \(module, batch\) -> tensor, the name of a method"):
        Laziness(forward=forward)


def _bert_logits(m, b):
    return m.net(input_ids=b[0], attention_mask=b[1]).logits


def test_callback_on_bert_falls_back_to_one_example_at_a_time(lightning, tmp_path):
    """Hugging Face BERT's attention-mask code branches on tensor values, which vmap cannot batch: the kernel falls
    back to one example at a time with one warning, and the logged values match explicit autograd Jacobians."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)

    class Bert(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = transformers.BertForSequenceClassification(config)

        def training_step(self, batch, batch_idx):
            ids, mask, y = batch
            return self.net(input_ids=ids, attention_mask=mask, labels=y).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(1, 20, (8, 6), generator=g), torch.randint(0, 3, (8,), generator=g)
    mask = torch.ones(8, 6, dtype=torch.long)
    mask[::2, 4:] = 0  # padded examples: the mask code takes its data-dependent branch
    model = Bert()
    model0 = copy.deepcopy(model)
    probe = (ids[:4], mask[:4])
    cb = Laziness(probe=probe, kernel_probe_size=3, every_n_steps=3, forward=_bert_logits)
    trainer = make_trainer(lightning, max_steps=3, callbacks=[cb], default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"vmap cannot batch the kernel probe through Bert") as record:
        trainer.fit(model, DataLoader(TensorDataset(ids, mask, y), batch_size=4))
    ours = [w for w in record if "Laziness:" in str(w.message)]
    assert len(ours) == 1 and "Set Laziness(chunk_size=1)" in str(ours[0].message)  # one warning for the whole fit
    gap, kd = _expected_laziness(model0, model, _bert_logits, probe, 3)
    assert cb.last["laziness/linearization_gap"] > 0.05 and cb.last["laziness/kernel_distance"] > 1e-3
    assert cb.last["laziness/linearization_gap"] == pytest.approx(float(gap), rel=1e-3)
    assert cb.last["laziness/kernel_distance"] == pytest.approx(float(kd), rel=1e-3)
