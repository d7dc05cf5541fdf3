"""LabelNoise on the labels real models train on: padding (ignore_index), class-conditional flips (pair, a
transition matrix), one-hot targets, num_classes lookup, batches without a label, label dtypes.

Statistical checks use fixed seeds and 5-sigma binomial bounds (a bound a correct draw misses with probability
below ~1e-6 per cell); the draws themselves are also compared with an independent computation from CounterRNG.
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_lnsgd.callbacks import label_noise
from lightning_lnsgd.callbacks.label_noise import LabelNoise
from lightning_lnsgd.callbacks.label_targets import find_num_classes
from lightning_lnsgd.rng import CounterRNG
from tests.conftest import make_trainer, read_scalars

#: A 3-class transition matrix with an asymmetric, class-dependent off-diagonal part (cleanlab's noise_matrix
#: convention transposed: row c is the distribution of the noisy label of class c).
T3 = [[0.7, 0.2, 0.1], [0.0, 0.9, 0.1], [0.25, 0.25, 0.5]]


def _trainer0(step: int = 0):
    return SimpleNamespace(lightning_module=None, global_step=step, global_rank=0)


def _bits(seed: int, shape, step: int = 0) -> torch.Tensor:
    rng = CounterRNG(seed, "label_noise")
    rng.counter = step
    return rng.bits(shape)


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(max(n * p * (1 - p), 1e-12)) + 1e-9


# ---------------------------------------------------------------------------------------------- ignore_index


@pytest.mark.parametrize("pad,dtype", [(-100, torch.int64), (255, torch.uint8)], ids=["-100", "255-uint8"])
def test_padding_is_never_changed_counted_or_range_checked(pad, dtype):
    c, n = 5, 20_000
    y = (torch.arange(n) % c).to(dtype)
    y[::3] = pad  # a third of the entries are padding (out of the class range)
    cb = LabelNoise(kind="flip", flip_prob=1.0, num_classes=c, ignore_index=pad, seed=2)
    (x, noisy) = cb.noisy_batch((torch.zeros(n), y.clone()), _trainer0())
    pad_mask = y == pad
    assert noisy.dtype == dtype and torch.equal(noisy[pad_mask], y[pad_mask])
    assert (noisy[~pad_mask] != y[~pad_mask]).all()  # flip_prob=1: every real label changed
    assert cb._flipped_frac(cb._last["mask"], cb._last["counted"], 0) == 1.0  # over the non-ignored entries only
    # The draws of the other entries are those of a batch without padding: padding consumes its own draw only.
    clean = (torch.arange(n) % c).to(dtype)
    (_, ref) = LabelNoise(kind="flip", flip_prob=1.0, num_classes=c, seed=2).noisy_batch((x, clean), _trainer0())
    assert torch.equal(noisy[~pad_mask], ref[~pad_mask])
    # Noise off (flip_prob=0 or a schedule off): padding is still accepted.
    (_, off) = LabelNoise(kind="flip", flip_prob=0.0, num_classes=c, ignore_index=pad).noisy_batch((x, y), _trainer0())
    assert torch.equal(off, y)
    # ignore_index=None: the padding value is an ordinary label again, out of range.
    if dtype == torch.int64:
        with pytest.raises(ValueError, match=r"needs labels in \[0, 4\].*holds label -100"):
            LabelNoise(kind="flip", num_classes=c, ignore_index=None).noisy_batch((x, y), _trainer0())


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_padding_in_regression_targets(kind):
    y = torch.linspace(-1, 1, 1000)
    y[::4] = -100.0
    (_, noisy) = LabelNoise(kind=kind, sigma=1.0, seed=1).noisy_batch((y, y.clone()), _trainer0())
    pad = y == -100.0
    assert torch.equal(noisy[pad], y[pad]) and (noisy[~pad] != y[~pad]).all()
    (_, plain) = LabelNoise(kind=kind, sigma=1.0, seed=1, ignore_index=None).noisy_batch((y, y), _trainer0())
    assert torch.equal(noisy[~pad], plain[~pad]) and (plain[pad] != -100.0).all()


# ---------------------------------------------------------------------------------------------- transitions


def test_symmetric_is_the_default_and_pair_moves_to_the_next_class():
    c, n, tau = 4, 100_000, 0.3
    y = torch.arange(n) % c
    sym_default = LabelNoise(kind="flip", flip_prob=tau, num_classes=c, seed=5, target=0).noisy_batch((y,))[0]
    sym = LabelNoise(kind="flip", flip_prob=tau, num_classes=c, seed=5, target=0, transition="symmetric")
    assert torch.equal(sym.noisy_batch((y,))[0], sym_default)
    pair = LabelNoise(kind="flip", flip_prob=tau, num_classes=c, seed=5, target=0, transition="pair")
    (noisy,) = pair.noisy_batch((y,))
    changed = noisy != y
    assert _within(int(changed.sum()), n, tau)
    assert torch.equal(noisy[changed], (y[changed] + 1) % c)
    z = _bits(5, (n,))
    assert torch.equal(changed, ((z >> 32) & 0xFFFFFFFF).double() * 2.0**-32 < tau)  # the same decision bits
    assert LabelNoise(kind="flip").flip_prob == 0.1  # flip_prob None means 0.1 for symmetric / pair


def _matrix_reference(y: torch.Tensor, T: torch.Tensor, seed: int, step: int = 0, factor: float = 1.0):
    """The documented draw, computed independently: redraw with probability f from the high 32 bits, then the
    smallest j with l < 2^32 * cumsum(T[y])[j] from the low 32 bits."""
    z = _bits(seed, tuple(y.shape), step)
    redraw = ((z >> 32) & 0xFFFFFFFF).double() * 2.0**-32 < factor
    low = (z & 0xFFFFFFFF).double()
    cdf = torch.round(torch.cumsum(T.double(), 1) * 2.0**32)
    cdf[:, -1] = 2.0**32
    new = (low[:, None] >= cdf[y]).sum(1)
    return torch.where(redraw, new, y)


def test_transition_matrix_frequencies_and_draws():
    T = torch.tensor(T3, dtype=torch.float64)
    n_per, c = 60_000, 3
    y = torch.arange(c).repeat_interleave(n_per)
    cb = LabelNoise(kind="flip", transition=T3, seed=7, target=0)
    assert cb.num_classes == 3 and cb.flip_prob is None
    (noisy,) = cb.noisy_batch((y,))
    assert torch.equal(noisy, _matrix_reference(y, T, 7))
    freq = torch.zeros(c, c)
    for a in range(c):
        counts = torch.bincount(noisy[y == a], minlength=c)
        freq[a] = counts / n_per
        for j in range(c):  # each cell within 5 binomial sigmas of T[a, j] (exact 0 where T is 0)
            assert _within(int(counts[j]), n_per, T3[a][j]), (a, j, freq[a, j].item(), T3[a][j])
    # The logged level is the expected changed fraction with balanced classes, flipped_frac the measured one.
    expected = (1 - T.diagonal()).mean().item()
    assert cb.level == pytest.approx(expected)
    measured = cb._flipped_frac(cb._last["mask"], cb._last["counted"], 0)
    assert measured == pytest.approx((noisy != y).float().mean().item()) and _within(round(measured * y.numel()), y.numel(), expected)


def test_transition_matrix_with_a_schedule_and_on_resume():
    T = torch.tensor(T3, dtype=torch.float64)
    y = torch.arange(3).repeat(2000)
    opts = dict(kind="flip", transition=T, seed=3, target=0, schedule="decay", decay_until=4)
    cb = LabelNoise(**opts)
    runs = [cb.noisy_batch((y,), _trainer0(step))[0] for step in range(4)]
    for step, got in enumerate(runs):  # factor f = 1 - step/4: the matrix (1 - f) I + f T
        assert torch.equal(got, _matrix_reference(y, T, 3, step, 1 - step / 4)), step
    resumed = LabelNoise(**opts)
    resumed.load_state_dict({**cb.state_dict(), "counter": 2})
    assert torch.equal(resumed.noisy_batch((y,), _trainer0(2))[0], runs[2])
    assert cb.level_at(2) == pytest.approx(0.5 * (1 - T.diagonal()).mean().item())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(transition=[[0.9, 0.2], [0.5, 0.5]]), r"row 0 of `transition` sums to 1\.1, not 1"),
        (dict(transition=[[1.0, 0.0], [0.5, 0.4]]), r"row 1 of `transition` sums to 0\.9"),
        (dict(transition=[[1.0, 0.0], [1.5, -0.5]]), r"row 1 of `transition` has an entry that is not a finite number >= 0"),
        (dict(transition=[[1.0, 0.0, 0.0], [0.0, 1.0], [0, 0, 1]]), r"row 1 of `transition` is \[0\.0, 1\.0\]; .* C = 3"),
        (dict(transition=torch.eye(3)[:2]), r"row 0 of `transition` is .* C = 2 rows needs 2 entries"),
        (dict(transition=[[1.0]]), r"needs C >= 2 rows"),
        (dict(transition="uniform"), r"`transition` must be 'symmetric', 'pair' or a C x C .* got 'uniform'"),
        (dict(transition=T3, flip_prob=0.1), r"`flip_prob` must not be given with a `transition` matrix.*0\.1"),
        (dict(transition=T3, num_classes=4), r"`num_classes`=4 does not match the 3 x 3 `transition` matrix"),
        (dict(kind="gaussian", transition="pair"), r"`transition` applies to kind='flip' only"),
        (dict(ignore_index=1.5), r"`ignore_index` must be an int .* got 1\.5"),
    ],
)
def test_transition_and_ignore_index_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelNoise(**{"kind": "flip", **kwargs})


# ---------------------------------------------------------------------------------------------- target kinds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_hot_in_one_hot_out(dtype):
    c, n = 4, 4000
    idx = torch.arange(n) % c
    onehot = F.one_hot(idx, c).to(dtype)
    onehot[5] = -100  # a padded row
    opts = dict(kind="flip", flip_prob=0.4, num_classes=c, seed=8, target=0, transition="pair")
    (out,) = LabelNoise(**opts).noisy_batch((onehot,))
    assert out.dtype == dtype and out.shape == onehot.shape
    rows = torch.cat([out[:5], out[6:]])
    assert ((rows == 0) | (rows == 1)).all() and (rows.sum(-1) == 1).all()
    assert torch.equal(out[5], onehot[5])
    (ref,) = LabelNoise(**opts).noisy_batch((idx,))  # the same draw on the class indices
    assert torch.equal(out.argmax(-1)[idx != -1][torch.arange(n) != 5], ref[torch.arange(n) != 5])


def test_soft_targets_refused_and_float_multilabel_kept():
    smooth = torch.full((8, 4), 0.025) + 0.9 * F.one_hot(torch.arange(8) % 4, 4)
    with pytest.raises(ValueError, match=r"soft target Tensor\(float32, \[8, 4\]\).*label smoothing, mixup.*flip the"
                                         r" hard labels before smoothing or mixing, or use kind='gaussian'"):
        LabelNoise(kind="flip", num_classes=4, target=0).noisy_batch((smooth,))
    # Multi-label 0/1 entries (last dim 5 != C = 2) flip one by one, as integer 0/1 targets do.
    multi = (torch.arange(5000).view(1000, 5) % 3 == 0)
    opts = dict(kind="flip", flip_prob=0.2, num_classes=2, seed=4, target=0)
    (as_float,) = LabelNoise(**opts).noisy_batch((multi.float(),))
    (as_int,) = LabelNoise(**opts).noisy_batch((multi.long(),))
    assert as_float.dtype == torch.float32 and torch.equal(as_float.long(), as_int)
    assert _within(int((as_int != multi.long()).sum()), multi.numel(), 0.2)


def test_integer_dtype_that_cannot_hold_the_classes_is_refused():
    with pytest.raises(ValueError, match=r"dtype torch.uint8 \(max 255\), which cannot hold class 299 of num_classes=300"):
        LabelNoise(kind="flip", num_classes=300).noisy_batch((torch.zeros(4), torch.zeros(4, dtype=torch.uint8)))
    (_, out) = LabelNoise(kind="flip", num_classes=256, flip_prob=1.0).noisy_batch(
        (torch.zeros(4), torch.full((4,), 255, dtype=torch.uint8)))  # 255 is a class here (ignore_index is -100)
    assert out.dtype == torch.uint8 and (out != 255).all()


# ---------------------------------------------------------------------------------------------- batches


def test_batches_without_a_label_are_refused():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"single Tensor\(float32, \[2, 32\]\) with no separate label.*never inputs"):
        LabelNoise(kind="gaussian").noisy_batch(x)
    with pytest.raises(ValueError, match=r"one-element list\[0: Tensor\(float32, \[2, 32\]\)\].*set target=0"):
        LabelNoise(kind="gaussian").noisy_batch([x])
    (out,) = LabelNoise(kind="gaussian", target=0).noisy_batch([x])  # said explicitly: the element is the label
    assert not torch.equal(out, x)


def test_boring_model_bare_tensor_batch_refused_and_data_untouched(lightning):
    boring = importlib.import_module(f"{lightning.__name__}.demos.boring_classes")
    model = boring.BoringModel()
    data = boring.RandomDataset(32, 16)
    before = data.data.clone()
    trainer = make_trainer(lightning, max_steps=2, callbacks=[LabelNoise(kind="gaussian", sigma=1.0)])
    with pytest.raises(ValueError, match=r"training batch is a single Tensor\(float32, \[2, 32\]\)"):
        trainer.fit(model, DataLoader(data, batch_size=2))
    assert torch.equal(data.data, before)


# ---------------------------------------------------------------------------------------------- num_classes


def test_num_classes_lookup_names_and_places(lightning):
    transformer = importlib.import_module(f"{lightning.__name__}.demos.transformer")
    lstm = importlib.import_module(f"{lightning.__name__}.demos.lstm")
    found = find_num_classes(transformer.LightningTransformer(vocab_size=11))
    assert (found.value, found.source) == (11, "LightningTransformer.model.decoder.out_features (the last layer, Linear)")
    assert find_num_classes(lstm.LightningLSTM(vocab_size=13)).value == 13
    hf = SimpleNamespace(config=SimpleNamespace(num_labels=7))
    assert find_num_classes(hf).value == 7  # a plain config object: module.config.num_labels
    assert find_num_classes(SimpleNamespace(hparams={"num_labels": 5})).source == "SimpleNamespace.hparams['num_labels']"
    assert find_num_classes(SimpleNamespace(), SimpleNamespace(hparams={"vocab_size": 9})).value == 9
    assert find_num_classes(SimpleNamespace(num_classes=3, vocab_size=50)).value == 3  # vocab_size only as a last resort
    found = find_num_classes(SimpleNamespace(num_classes=1))
    assert found.value is None and found.looked[1] == "SimpleNamespace" and "the datamodule (none)" in found.looked


class _Tagger(torch.nn.Module):
    """Token tagger: embeddings of a vocabulary, a linear head over the tags."""

    def __init__(self, vocab_size: int, num_tags: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, num_tags)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def _token_module(lightning, net, loss, **hparams):
    """A LightningModule around ``net`` that saves ``hparams`` and records the labels ``training_step`` sees."""

    class TokenModule(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters(hparams)
            self.net, self.seen = net, []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["labels"].clone())
            return loss(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return TokenModule()


def _token_batches(vocab: int, classes: int, n: int = 8, t: int = 6, pad_from: int = 4):
    """Dict batches as a Hugging Face collator gives them: input_ids, attention_mask, labels (-100 on padding)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    labels = torch.randint(0, classes, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[: n // 2, pad_from:], labels[: n // 2, pad_from:], ids[: n // 2, pad_from:] = 0, -100, 0
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]
    return DataLoader(rows, batch_size=4), labels


def _fit_flip(lightning, module, data, monkeypatch):
    """Fits 2 steps with flips at τ = 1; returns the callback and the lines it logged through rank_zero_info."""
    logged: list[str] = []
    monkeypatch.setattr(label_noise, "rank_zero_info", logged.append)
    noise = LabelNoise(kind="flip", flip_prob=1.0, seed=3)  # target: the "labels" key, found by default
    make_trainer(lightning, max_steps=2, callbacks=[noise]).fit(module, data)
    return noise, logged


def _check_flipped(seen, labels, classes):
    for step, noisy in enumerate(seen):
        clean = labels[4 * step : 4 * step + 4]
        pad = clean == -100
        assert torch.equal(noisy[pad], clean[pad])
        assert ((noisy[~pad] >= 0) & (noisy[~pad] < classes) & (noisy[~pad] != clean[~pad])).all()  # τ = 1


def _loss_of_logits(net, batch):
    logits = net(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def test_num_classes_of_a_tagger_is_its_tag_space_not_its_vocabulary(lightning, monkeypatch):
    module = _token_module(lightning, _Tagger(30, 7), _loss_of_logits, vocab_size=30, num_tags=7)
    data, labels = _token_batches(30, 7)
    noise, logged = _fit_flip(lightning, module, data, monkeypatch)
    assert noise.num_classes == 7
    assert logged == ["LabelNoise: num_classes=7, from TokenModule.net.head.out_features (the last layer, Linear)."]
    _check_flipped(module.seen, labels, 7)


def test_num_classes_sources_that_disagree_stop_the_run(lightning):
    module = _token_module(lightning, _Tagger(30, 7), _loss_of_logits, num_classes=10)
    data, _ = _token_batches(30, 7)
    trainer = make_trainer(lightning, max_steps=1, callbacks=[LabelNoise(kind="flip")])
    with pytest.raises(ValueError, match=r"^LabelNoise: two sources of num_classes disagree: TokenModule.net.head"
                                         r".out_features \(the last layer, Linear\) is 7 but TokenModule.hparams"
                                         r"\['num_classes'\] is 10; set `num_classes=` to the number of classes"):
        trainer.fit(module, data)
    module = _token_module(lightning, _Tagger(30, 7), _loss_of_logits, num_classes=10)
    noise = LabelNoise(kind="flip", num_classes=7)  # the fix the message names
    make_trainer(lightning, max_steps=1, callbacks=[noise]).fit(module, data)
    assert noise.num_classes == 7


def _bert_config(**kw):
    transformers = pytest.importorskip("transformers")
    return transformers, dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              max_position_embeddings=16, **kw)


def _hugging_face_loss(net, batch):
    return net(**batch).loss  # the model's own cross-entropy, -100 ignored


def test_num_classes_of_a_bert_token_classifier_is_num_labels(lightning, monkeypatch):
    transformers, kw = _bert_config(vocab_size=100, num_labels=5)
    torch.manual_seed(0)
    bert = transformers.BertForTokenClassification(transformers.BertConfig(**kw))
    module = _token_module(lightning, bert, _hugging_face_loss, vocab_size=100)  # hparams.vocab_size: not labels
    data, labels = _token_batches(100, 5)
    noise, logged = _fit_flip(lightning, module, data, monkeypatch)
    assert noise.num_classes == 5
    assert logged == ["LabelNoise: num_classes=5, from TokenModule.net.config.num_labels (BertForTokenClassification)."]
    _check_flipped(module.seen, labels, 5)


def test_num_classes_around_a_hugging_face_model_without_a_head():
    transformers, kw = _bert_config(vocab_size=20)
    config = transformers.BertConfig(**kw)

    class HeadAfter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert, self.head = transformers.BertModel(config), torch.nn.Linear(16, 7)

    class HeadFirst(torch.nn.Module):  # registration order puts the encoder's pooler last: hidden states, not classes
        def __init__(self):
            super().__init__()
            self.head, self.bert = torch.nn.Linear(16, 7), transformers.BertModel(config)

    assert find_num_classes(HeadAfter()).source == "HeadAfter.head.out_features (the last layer, Linear)"
    assert find_num_classes(HeadFirst()).value is None
    wrapped = torch.nn.Module()
    wrapped.model = transformers.BertModel(config)
    found = find_num_classes(wrapped)
    assert found.value is None  # config.num_labels (2) and config.vocab_size (20) of a headless model: no label space
    assert "Module.model.config (a Hugging Face config: read through its model's head)" in found.looked


def test_num_classes_of_gpt2_is_its_vocabulary(lightning, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)  # config.num_labels: 2, as every HF config
    gpt2 = transformers.GPT2LMHeadModel(config)
    module = _token_module(lightning, gpt2, _hugging_face_loss)
    data, labels = _token_batches(50, 50)
    noise, logged = _fit_flip(lightning, module, data, monkeypatch)
    assert config.num_labels == 2 and noise.num_classes == 50
    assert logged == ["LabelNoise: num_classes=50, from the output embeddings of TokenModule.net (GPT2LMHeadModel:"
                      " its vocabulary)."]
    _check_flipped(module.seen, labels, 50)


def test_num_classes_missing_error_lists_the_places(lightning):
    boring = importlib.import_module(f"{lightning.__name__}.demos.boring_classes")

    class Normed(boring.BoringModel):  # its last layer with parameters (a LayerNorm) has no output size
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(2)

    trainer = make_trainer(lightning, max_steps=1, callbacks=[LabelNoise(kind="flip")])
    data = TensorDataset(torch.zeros(4, 32), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"the model's output layer does not give it, and none of the names"
                                         r" num_classes, num_labels, vocab_size holds an int >= 2 on"
                                         r" Normed; Normed.hparams; Normed.model \(none\);"
                                         r".*the datamodule \(none\)"):
        trainer.fit(Normed(), DataLoader(data, batch_size=2))


# ---------------------------------------------------------------------------------------------- a language model


def _padded_tokens(vocab: int, n: int = 32, t: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, t + 1), generator=g)
    lengths = torch.randint(4, t + 1, (n,), generator=g)
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    for i, length in enumerate(lengths.tolist()):
        inputs[i, length:] = 0  # pad token id of the inputs
        targets[i, length:] = -100  # ignored by nll_loss and by LabelNoise
    return inputs, targets


@pytest.mark.parametrize("transition", ["pair", T3], ids=["pair", "matrix"])
def test_demo_transformer_language_model_with_padding(lightning, transition, tmp_path):
    transformer = importlib.import_module(f"{lightning.__name__}.demos.transformer")

    class PaddedLM(transformer.LightningTransformer):
        """Lightning's demo Transformer on padded token batches; records the targets training_step receives."""

        def __init__(self, vocab_size: int) -> None:
            super().__init__(vocab_size=vocab_size)
            self.seen: list = []

        def prepare_data(self) -> None:  # the demo downloads WikiText-2 here; these tokens are synthetic
            pass

        def training_step(self, batch, batch_idx):
            inputs, target = batch
            self.seen.append((batch_idx, target.clone()))
            return F.nll_loss(self.model(inputs, inputs), target.reshape(-1), ignore_index=-100)

    vocab = 3 if not isinstance(transition, str) else 20
    inputs, targets = _padded_tokens(vocab)
    dataset = TensorDataset(inputs, targets)
    before = [t.clone() for t in dataset.tensors]
    model = PaddedLM(vocab)
    kw = dict(flip_prob=0.5) if isinstance(transition, str) else {}
    noise = LabelNoise(kind="flip", transition=transition, seed=6, **kw)  # num_classes = model.model.vocab_size
    logger = importlib.import_module(f"{lightning.__name__}.loggers").TensorBoardLogger(tmp_path, name="lm")
    trainer = make_trainer(lightning, max_epochs=1, callbacks=[noise], logger=logger, log_every_n_steps=1)
    trainer.fit(model, DataLoader(dataset, batch_size=8))
    assert noise.num_classes == vocab and noise.counter == 4
    assert all(torch.equal(a, b) for a, b in zip(dataset.tensors, before))  # the dataset is bit-identical
    changed = counted = 0
    flipped_frac = dict(read_scalars(logger.log_dir)["label_noise/flipped_frac"])
    for batch_idx, seen in model.seen:
        clean = targets[8 * batch_idx : 8 * batch_idx + 8]
        pad = clean == -100
        assert torch.equal(seen[pad], clean[pad])  # padding untouched
        assert ((seen[~pad] >= 0) & (seen[~pad] < vocab)).all()
        if transition == "pair":
            diff = seen != clean
            assert torch.equal(seen[diff], (clean[diff] + 1) % vocab)
        frac = (seen != clean).sum().item() / (~pad).sum().item()
        assert flipped_frac[batch_idx + 1] == pytest.approx(frac, abs=1e-6)  # measured over real tokens only
        changed, counted = changed + (seen != clean).sum().item(), counted + (~pad).sum().item()
    p = 0.5 if transition == "pair" else float(sum(1 - T3[c][c] for c in range(3)) / 3)
    assert _within(changed, counted, p, sigmas=5.5)


# ---------------------------------------------------------------------------------------------- accelerator


@pytest.mark.gpu
def test_gpu_bad_label_raised_at_end_of_fit_and_never_flipped(lightning):
    class Model(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 3)
            self.seen: list = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(y.cpu().clone())
            return self.lin(x).sum() * 0.0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    y = torch.tensor([0, 1, 2, -100, 0, 1, 2, 7])  # batch 0: valid with padding; batch 1 holds the bad label 7
    noise = LabelNoise(kind="flip", flip_prob=1.0, num_classes=3)
    trainer = make_trainer(lightning, accelerator="cuda", devices=1, max_epochs=1, log_every_n_steps=50, callbacks=[noise])
    model = Model()
    with pytest.raises(ValueError, match=r"holds label 7"):
        trainer.fit(model, DataLoader(TensorDataset(torch.zeros(8, 1), y), batch_size=4))
    assert model.seen[1][3] == 7 and model.seen[0][3] == -100  # the bad label and the padding were never changed


def test_transition_matrix_from_the_command_line(lightning, tmp_path):
    cli_module = importlib.import_module(f"{lightning.__name__}.cli")
    boring = importlib.import_module(f"{lightning.__name__}.demos.boring_classes")
    cli = cli_module.LightningCLI(
        boring.BoringModel,
        args=[
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.accelerator=cpu",
            "--trainer.callbacks+=lightning_lnsgd.LabelNoise", "--trainer.callbacks.init_args.kind=flip",
            "--trainer.callbacks.init_args.transition=[[0.7, 0.2, 0.1], [0.0, 0.9, 0.1], [0.25, 0.25, 0.5]]",
            "--trainer.callbacks.init_args.ignore_index=255",
        ],
        run=False,
        save_config_callback=None,
    )
    (noise,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LabelNoise)]
    assert noise.num_classes == 3 and noise.ignore_index == 255 and noise.flip_prob is None
    assert torch.equal(noise.transition.matrix, torch.tensor(T3, dtype=torch.float64))
