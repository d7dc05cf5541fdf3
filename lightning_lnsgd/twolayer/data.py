"""The paper's synthetic data: Gaussian inputs labelled by a (sparse) linear teacher θ⋆."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checks import is_int
from ..compat import pl
from ..protocol import step_layout
from ..rng import CounterRNG, replica_stream

__all__ = ["IndexedInputs", "SparseTeacherDataModule"]


@dataclass
class IndexedInputs:
    """The inputs of a fused training batch as rows of the training set, ``source[index]``, gathered by the consumer a
    few steps at a time, so that a batch of ``R`` replicas × ``k`` steps × ``B`` examples holds ``R·k·B`` indices
    rather than ``R·k·B·d`` inputs.

    A dataclass of tensors, so that Lightning moves it to the device and its precision plugin converts ``source``.
    """

    #: The training inputs ``(n, d)``.
    source: torch.Tensor
    #: Row of ``source`` of each example, int64, ``(R, k, B)`` or ``(k, B)``.
    index: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the gathered inputs, ``index.shape + (d,)``."""
        return (*self.index.shape, self.source.shape[-1])

    def gather(self, steps: slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The inputs of the SGD steps ``steps`` (a slice of the step axis), in ``dtype`` (default: the source's)."""
        source = self.source if dtype is None else self.source.to(dtype)
        return source[self.index[..., steps, :]]



class _Draw:
    """Placeholder batch: the sample is drawn when Lightning consumes it, not when it prefetches.

    Lightning fetches one batch ahead; drawing indices at fetch time would leave the sampler one
    draw ahead of the optimizer at every checkpoint and break exact resume.
    """

    __slots__ = ()


_DRAW = _Draw()


class _DrawLoader:
    """An epoch of ``length`` placeholder batches; cheap to iterate, nothing to collate.

    Resumable (Lightning's ``state_dict`` protocol): the state is the number of this epoch's
    batches *consumed* (counted by the datamodule when it draws one, so Lightning's prefetch
    does not shift it); a mid-epoch resume then finishes the epoch with the remaining batches.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.consumed = 0
        self._skip = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.consumed = skip
        for _ in range(self.length - skip):
            yield _DRAW

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = int(state["consumed"])
        self._skip = consumed if consumed < self.length else 0  # a finished epoch restarts whole


class _FullBatch:
    """A loader of exactly one batch (a list would read as several dataloaders to Lightning)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield self.tensors


class SparseTeacherDataModule(pl.LightningDataModule):
    """Inputs x ~ N(0, I_d), clean labels y = θ⋆ᵀx, sampled online with replacement.

    Args:
        dim: input dimension d.
        n_train: size n of the finite training set that SGD samples from.
        n_test: size of the held-out test set (fresh inputs, same θ⋆).
        teacher_norm: ‖θ⋆‖.
        teacher_nonzeros: number k of non-zero coordinates of θ⋆ (``None``: dense, k = d).
        batch_size: examples per SGD step, drawn uniformly with replacement from the training set.
        seed: seeds the data, the teacher and the sampling stream (with the DDP rank mixed in, except for
            replicas sharded over ranks: see :mod:`lightning_lnsgd.protocol`).
        steps_per_epoch: training batches per Lightning epoch (default ⌈n_train / batch_size⌉);
            an epoch only paces validation and epoch-end hooks, sampling is i.i.d. regardless.

    The tensors live on the training device after ``setup``; a training batch ``(x, y)`` is a
    fresh gather, so nothing downstream (label noise, user code) can modify the stored data. For a module with a
    fused layout (:mod:`lightning_lnsgd.protocol`) ``x`` is an :class:`IndexedInputs`, the sampled rows of the
    training set, and ``y`` their labels ``(R, k, B)``: the batch does not grow with d.
    The validation and test loaders yield the test set as one batch.
    """

    def __init__(
        self,
        dim: int = 20,
        n_train: int = 200,
        n_test: int = 2000,
        teacher_norm: float = 1.0,
        teacher_nonzeros: int | None = None,
        batch_size: int = 1,
        seed: int = 0,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("n_train", n_train, 1), ("n_test", n_test, 1), ("batch_size", batch_size, 1)):
            if not is_int(value) or value < low:
                raise ValueError(f"SparseTeacherDataModule: `{name}` must be an integer ≥ {low}, got {value!r}.")
        if not isinstance(teacher_norm, (int, float)) or not 0 <= teacher_norm < float("inf"):
            raise ValueError(f"SparseTeacherDataModule: `teacher_norm` must be ≥ 0, got {teacher_norm!r}.")
        if teacher_nonzeros is not None and not (is_int(teacher_nonzeros) and 1 <= teacher_nonzeros <= dim):
            raise ValueError(
                f"SparseTeacherDataModule: `teacher_nonzeros` must be between 1 and dim={dim} (or null for dense), "
                f"got {teacher_nonzeros!r}."
            )
        if steps_per_epoch is not None and not (is_int(steps_per_epoch) and steps_per_epoch >= 1):
            raise ValueError(f"SparseTeacherDataModule: `steps_per_epoch` must be ≥ 1, got {steps_per_epoch!r}.")
        # logger=False: Lightning refuses to log two hparams sets sharing a key (both have `seed`).
        self.save_hyperparameters(logger=False)
        self.dim, self.n_train, self.n_test, self.batch_size, self.seed = dim, n_train, n_test, batch_size, seed
        self.steps_per_epoch = steps_per_epoch or -(-n_train // batch_size)

        gen = torch.Generator().manual_seed(int(seed))
        support = torch.randperm(dim, generator=gen)[: teacher_nonzeros or dim]
        teacher = torch.zeros(dim, dtype=torch.float64)
        teacher[support] = torch.randn(len(support), generator=gen, dtype=torch.float64)
        teacher *= teacher_norm / teacher.norm().clamp_min(1e-300)
        x_train = torch.randn(n_train, dim, generator=gen, dtype=torch.float64)
        x_test = torch.randn(n_test, dim, generator=gen, dtype=torch.float64)
        # Labels are computed in float64 so that they do not depend on the training dtype.
        self.teacher = teacher.float()
        self.x_train, self.y_train = x_train.float(), (x_train @ teacher).float()
        self.x_test, self.y_test = x_test.float(), (x_test @ teacher).float()
        self._sampler = CounterRNG(seed, stream="sampling")
        self._rank = 0
        self._train_loader: _DrawLoader | None = None
        self._replica_sampler: tuple[tuple[tuple[int, ...], int], CounterRNG] | None = None

    # -- device placement and sampling ------------------------------------------------------
    def setup(self, stage: str) -> None:
        device, rank = torch.device("cpu"), 0
        if self.trainer is not None:
            device, rank = self.trainer.strategy.root_device, self.trainer.global_rank
        for name in ("teacher", "x_train", "y_train", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))
        # The rank is known only now; the counter may already come from a checkpoint.
        state = self._sampler.state_dict()
        self._sampler = CounterRNG(self.seed, stream="sampling", rank=rank)
        self._sampler.load_state_dict(state)
        self._rank, self._replica_sampler = rank, None

    def sample(
        self, n: int | None = None, replica_seeds: list[int] | None = None, rank: int | None = None,
        indexed: bool = False,
    ) -> tuple[torch.Tensor | IndexedInputs, torch.Tensor]:
        """Draws a training batch ``(x, y)`` uniformly with replacement from the training set.

        ``n`` stacks that many SGD steps' batches, ``(n, B, d)``, equal to n single draws;
        ``replica_seeds`` adds a leading replica axis, each replica sampling from its own stream
        (seeded by the datamodule's seed and the replica's seed) in lockstep with this one;
        ``rank`` is the rank mixed into those streams (default: the DDP rank; 0 for replicas sharded over ranks);
        ``indexed``: ``x`` as the :class:`IndexedInputs` of the same draw.
        """
        sampler = self._sampler
        if replica_seeds is not None:
            key = (tuple(replica_seeds), self._rank if rank is None else int(rank))
            if self._replica_sampler is None or self._replica_sampler[0] != key:
                rng = CounterRNG([replica_stream(self.seed, s) for s in key[0]], stream="sampling", rank=key[1])
                self._replica_sampler = (key, rng)
            sampler = self._replica_sampler[1]
            sampler.counter = self._sampler.counter
        idx = sampler.randint(self.n_train, (self.batch_size,), n=n, device=self.x_train.device)
        self._sampler.counter = sampler.counter
        return (IndexedInputs(self.x_train, idx) if indexed else self.x_train[idx]), self.y_train[idx]

    def train_dataloader(self) -> _DrawLoader:
        self._train_loader = _DrawLoader(self.steps_per_epoch)
        return self._train_loader

    def val_dataloader(self) -> _FullBatch:
        return _FullBatch(self.x_test, self.y_test)

    def test_dataloader(self) -> _FullBatch:
        return _FullBatch(self.x_test, self.y_test)

    def predict_dataloader(self) -> _FullBatch:
        """The test inputs, one batch (``predict`` returns the model's predictions on them)."""
        return _FullBatch(self.x_test)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, _Draw):
            if self._train_loader is not None:
                self._train_loader.consumed += 1
            module = self.trainer.lightning_module if self.trainer is not None else None
            layout = step_layout(module)  # the fused engine's (replica seeds, k steps), or None
            batch = (
                self.sample()
                if layout is None
                else self.sample(
                    n=layout.steps,
                    replica_seeds=None if layout.replica_seeds is None else list(layout.replica_seeds),
                    rank=layout.stream_rank(self._rank),
                    indexed=True,
                )
            )
            if self.trainer is not None:
                batch = self.trainer.precision_plugin.convert_input(batch)
        return batch

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self._sampler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sampler.load_state_dict(state_dict["sampler"])
