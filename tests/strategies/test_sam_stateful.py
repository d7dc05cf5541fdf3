"""SAM with a training_step that carries state across steps (a recurrent model's hidden state): with the pattern of
docs/sam.md (the first pass records the new state, ``on_train_batch_end`` makes it current) the state advances once
per step and both passes of a step start from the same state; with the pattern of Lightning's demo LightningLSTM
(the state replaced inside ``training_step``) it advances twice."""

from types import ModuleType

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lnsgd.strategies import is_perturbed_pass, sam_strategy_class
from tests.conftest import make_trainer

STEPS = 5


def _recurrent_module(lightning: ModuleType, guarded: bool):
    """A token LSTM (Lightning's demo ``SimpleLSTM``, tiny) that records the state each pass starts from."""
    SimpleLSTM = lightning.demos.lstm.SimpleLSTM

    class StatefulLSTM(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = SimpleLSTM(vocab_size=12, ninp=6, nhid=6, nlayers=1, dropout=0.0)
            self.hidden = None
            self.advances = 0
            self.started_from: list[tuple[bool, torch.Tensor]] = []  # (perturbed?, h at the start of the pass)

        def training_step(self, batch, batch_idx):
            tokens, targets = batch
            if self.hidden is None:
                self.hidden = self.model.init_hidden(tokens.size(0))
            hidden = (self.hidden[0].detach(), self.hidden[1].detach())
            self.started_from.append((is_perturbed_pass(self), hidden[0].clone()))
            output, new_hidden = self.model(tokens, hidden)
            if not guarded:
                self.hidden = new_hidden
                self.advances += 1
            elif not is_perturbed_pass(self):
                self.next_hidden = new_hidden
            return torch.nn.functional.nll_loss(output, targets.reshape(-1))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if guarded:
                self.hidden = self.next_hidden
                self.advances += 1

        def train_dataloader(self):
            tokens = torch.randint(0, 12, (40, 7), generator=torch.Generator().manual_seed(0))
            return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4, drop_last=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return StatefulLSTM()


def _fit(lightning: ModuleType, guarded: bool):
    import importlib

    importlib.import_module(f"{lightning.__name__}.demos.lstm")
    torch.manual_seed(0)
    model = _recurrent_module(lightning, guarded)
    sam = sam_strategy_class(lightning)(rho=0.05)
    make_trainer(package=lightning, max_steps=STEPS, strategy=sam, limit_val_batches=0).fit(model)
    return model


def test_guarded_state_advances_once_per_step_and_both_passes_start_from_it(lightning):
    model = _fit(lightning, guarded=True)
    assert model.advances == STEPS
    passes = model.started_from
    assert [perturbed for perturbed, _ in passes] == [False, True] * STEPS
    for step in range(STEPS):
        (_, first), (_, second) = passes[2 * step], passes[2 * step + 1]
        assert torch.equal(first, second), step  # the perturbed pass sees the state the step started from
        if step:
            assert not torch.equal(first, passes[2 * step - 2][1])  # and the state did move between steps


def test_unguarded_state_advances_twice_per_step(lightning):
    # The failure the guard prevents: the demo's pattern lets the perturbed pass consume the first pass's state.
    model = _fit(lightning, guarded=False)
    assert model.advances == 2 * STEPS
    (_, first), (_, second) = model.started_from[2], model.started_from[3]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("guarded", [True, False])
def test_the_weights_do_not_depend_on_the_package(guarded):
    from lightning_lnsgd import compat
    from tests.conftest import LIGHTNING_PACKAGES

    if len(LIGHTNING_PACKAGES) < 2:
        pytest.skip("needs both pytorch_lightning and lightning installed")
    runs = [_fit(compat.package(name), guarded) for name in LIGHTNING_PACKAGES]
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)
