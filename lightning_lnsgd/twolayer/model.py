"""The paper's two-layer linear network as a LightningModule, with a generic and a fused path."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..callbacks.label_noise import LabelNoise
from ..compat import pl, rank_zero_warn, trainer_of
from ..protocol import StepLayout
from ..strategies import sam_settings
from . import engine
from . import functional as F
from .grid import expand_grid
from .recorder import DivergenceError, Recorder
from .replica_table import ReplicaTable
from .shard import ReplicaShard

__all__ = ["TwoLayerLinear", "DivergenceError"]

Backend = Literal["auto", "autograd", "torch", "numba", "triton"]


class TwoLayerLinear(pl.LightningModule):
    """ŷ = aᵀWx with W ∈ ℝ^{m×d}, a ∈ ℝ^m, both layers trained by plain SGD on ½(ŷ − ỹ)².

    Args:
        dim: input dimension d (the CLI fills it from the datamodule's ``dim``).
        width: number of neurons m.
        init: ``"ntk"``: W_ij ~ N(0, 1/d), aᵢ ~ N(0, 1/m).
        init_scale: multiplier α on the initialisation (α ≪ 1: small init, rich from the start);
            a list gives one value per replica.
        lr: SGD step size η (no momentum, no weight decay); a list gives one value per replica.
        seed: seed of the initialisation; replica r uses ``replica_seeds[r]`` (default ``seed + r``)
            for its initialisation, its data sampling and its label noise.
        replicas: K independent trainings stacked in one module (parameters ``(K, m, d)``, ``(K, m)``);
            ``None`` for one unstacked network.
        replica_seeds: one seed per replica (default ``[seed, seed + 1, …]``).
        steps_per_batch: SGD steps k fused into one Lightning step (closed-form gradients).
        backend: ``"autograd"``: the generic Lightning path (``torch.optim.SGD``, automatic
            optimisation; works with any strategy, DDP included); ``"torch"``, ``"numba"``,
            ``"triton"``: the fused closed-form path on that backend (under DDP it shards the replicas over
            the ranks, see below); ``"auto"``: the generic path
            for one unstacked network with ``steps_per_batch=1``, else the fused path on the
            fastest backend for the device (triton on CUDA, numba on CPU when width ≥ dim, torch otherwise).
        log_replicas: per-replica values (``train/loss``, ``dynamics/*``, ``phase/escape_step`` and the settings
            ``replica/*`` of each replica) are logged when K ≤ this; the mean over replicas is always written under
            the plain tag. With a TensorBoard logger each replica is its own run, ``<log_dir>/r03-sigma4-seed3`` (see
            :class:`~lightning_lnsgd.twolayer.replica_runs.ReplicaRuns`), with the tags of a single run; other loggers
            get ``<tag>/r{k}`` in the run itself. Every stacked run also writes each replica's settings, escape step
            and final values to the table ``replicas.csv`` in the log directory
            (:class:`~lightning_lnsgd.twolayer.replica_table.ReplicaTable`): past ``log_replicas`` that table is
            where they are.
        grid: the replicas as the product of named axes, e.g. ``{sigma: [1, 2, 4], lr: [5e-4, 1e-3], seed: [0, 1]}``
            (12 replicas), the last axis varying fastest (:func:`~lightning_lnsgd.twolayer.grid.expand_grid`). Axes:
            ``seed`` (replica seed = ``seed`` + value), ``lr``, ``init_scale`` (they replace the scalar argument of
            that name), ``sigma`` and ``rho`` (taken by ``LabelNoise(sigma="grid")`` and the SAM strategy's
            ``rho="grid"``, which a fit then requires). Without a ``seed`` axis replica r has seed ``seed + r``.
            Not with ``replica_seeds`` or a list ``lr``/``init_scale``; ``replicas``, if given, must equal the
            product.

    The training loss is ½·mean of (ŷ − ỹ)² over the batch targets as they arrive, so it is the
    noisy loss when a :class:`~lightning_lnsgd.LabelNoise` callback is attached.

    Steps: ``trainer.global_step`` and every logged step count *SGD steps*. On the fused path one
    Lightning step runs k SGD steps and advances ``global_step`` by k (the last one runs only what
    is left before ``trainer.max_steps``). Every ``trainer.log_every_n_steps`` SGD steps it logs,
    at TensorBoard step t = SGD steps done (step 0 is the initialisation): ``train/loss`` and
    ``test/loss`` (clean labels, whole sets) and the ``dynamics/*`` tags of
    :func:`~lightning_lnsgd.twolayer.dynamics.two_layer_dynamics`; ``phase/escape_step`` once, the first
    multiple of ``min(100, log_every_n_steps)`` steps at which ``dynamics/lazy_distance`` exceeds 1.

    DDP (fused path, ``strategy: ddp``, ``devices: N``, any ``num_nodes``): the K replicas are split into N contiguous
    blocks (the first K mod N one larger; K < N is refused) and rank r steps block r, with each replica's own seeds,
    samples, noise, η, σ and ρ, so every replica follows the trajectory it follows in one process, bit for bit. Every
    rank holds all replicas: after each Lightning step the ranks all-gather their blocks (weights, escape steps and
    the dynamics of the logging steps), rank 0 logs every replica's tags, and a checkpoint holds the whole sweep,
    which resumes exactly on any number of ranks (one process included). The generic path keeps Lightning's DDP
    (data parallel, one network).
    """

    def __init__(
        self,
        dim: int | None = None,
        width: int = 1000,
        init: Literal["ntk"] = "ntk",
        init_scale: float | list[float] = 1.0,
        lr: float | list[float] = 1e-3,
        seed: int = 0,
        replicas: int | None = None,
        replica_seeds: list[int] | None = None,
        steps_per_batch: int = 1,
        backend: Backend = "auto",
        log_replicas: int = 16,
        grid: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__()
        if dim is None or int(dim) != dim or dim < 1:
            raise ValueError(
                f"TwoLayerLinear: `dim` must be a positive integer (the CLI takes it from `data.dim`), got {dim!r}."
            )
        if int(width) != width or width < 1:
            raise ValueError(f"TwoLayerLinear: `width` must be a positive integer, got {width!r}.")
        if init != "ntk":
            raise ValueError(f"TwoLayerLinear: `init` must be 'ntk', got {init!r}.")
        if replicas is not None and (int(replicas) != replicas or replicas < 1):
            raise ValueError(f"TwoLayerLinear: `replicas` must be a positive integer or null, got {replicas!r}.")
        if int(steps_per_batch) != steps_per_batch or steps_per_batch < 1:
            raise ValueError(f"TwoLayerLinear: `steps_per_batch` must be an integer ≥ 1, got {steps_per_batch!r}.")
        if backend not in ("auto", "autograd", "torch", "numba", "triton"):
            raise ValueError(
                f"TwoLayerLinear: `backend` must be one of auto, autograd, torch, numba, triton; got {backend!r}."
            )
        # The arguments stay as given (save_hyperparameters reads them); these are the values the replicas run with.
        K, seeds, rate_arg, scale_arg = replicas, replica_seeds, lr, init_scale
        #: The grid's columns, one value per replica for each axis (``None`` without a grid).
        self.grid = None if grid is None else expand_grid(grid)
        if self.grid is not None:
            K_grid = len(next(iter(self.grid.values())))
            if replicas is not None and replicas != K_grid:
                raise ValueError(
                    f"TwoLayerLinear: `replicas`={replicas!r} but the grid's axes make {K_grid} replicas; leave "
                    "`replicas` unset or give the product of the axes' lengths."
                )
            if replica_seeds is not None:
                raise ValueError(
                    f"TwoLayerLinear: `replica_seeds`={replica_seeds!r} cannot be given with a `grid`; give the seeds"
                    " as the grid's `seed` axis."
                )
            for name, given in (("lr", lr), ("init_scale", init_scale)):
                if name in self.grid and not isinstance(given, (int, float)):
                    raise ValueError(
                        f"TwoLayerLinear: `{name}` is a list and `grid` has a `{name}` axis; give it in one place."
                    )
            K = K_grid
            if "seed" in self.grid:
                seeds = [seed + int(s) for s in self.grid["seed"]]
            rate_arg = self.grid.get("lr", lr)
            scale_arg = self.grid.get("init_scale", init_scale)
        #: ``K``, the stacked replicas (``None``: one unstacked network).
        self.replicas = K
        self.replica_seeds = None if K is None else _replica_list(seeds, K, seed)
        scales = _per_replica("init_scale", scale_arg, K)
        rates = _per_replica("lr", rate_arg, K)
        for name, given, values in (("init_scale", init_scale, scales), ("lr", lr, rates)):
            if not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"TwoLayerLinear: `{name}` must be finite and > 0 (or a list of such), got {given!r}.")
        self.fused = _fused(backend, K, steps_per_batch)
        if backend == "autograd" and (K is not None or steps_per_batch > 1):
            raise ValueError(
                "TwoLayerLinear: backend='autograd' runs one unstacked network one step at a time; with "
                f"replicas={K!r} or steps_per_batch={steps_per_batch} choose backend auto, torch, numba or triton."
            )
        self.save_hyperparameters()  # the arguments as given (a grid stays a grid)
        self.automatic_optimization = not self.fused
        self.steps_per_batch = int(steps_per_batch)
        self.init_scales = scales  # α per replica (one value without replicas)

        if K is None:
            W, a = F.ntk_init(width, dim, scales[0], seed)
        else:
            W, a = torch.empty(K, width, dim), torch.empty(K, width)
            for r, (scale, replica_seed) in enumerate(zip(scales, self.replica_seeds)):  # no second copy of the stack
                W[r], a[r] = F.ntk_init(width, dim, scale, replica_seed)
        # Trained on both paths (the fused engine updates them in place, without autograd); DDP needs a parameter
        # that requires grad to wrap the module.
        self.W = nn.Parameter(W)
        self.a = nn.Parameter(a)
        # The initial weights define the lazy ball. They travel with the module but not in the checkpoint: the
        # arguments that make them are fixed on resume (FIXED_ON_RESUME), so a resumed model rebuilds the same
        # ones, and a checkpoint (serialised in memory while Lightning saves it) holds one copy of the stack.
        self.register_buffer("W0", W.clone(), persistent=False)
        self.register_buffer("escape_step", torch.full(W.shape[:-2], -1, dtype=torch.int64))
        self.register_buffer("lr_per_replica", torch.tensor(rates if K is not None else rates[0]))
        self.teacher: torch.Tensor | None = None
        self._engine: engine.FusedEngine | None = None
        #: The replicas this rank steps in a distributed fit of the fused path (``None``: all of them).
        self.shard: ReplicaShard | None = None
        self.recorder = Recorder(self)
        #: Extra values for :class:`~lightning_lnsgd.progress.StepProgressBar` (the fused path's latest train loss).
        self.progress_metrics: dict[str, float] = {}

    # -- model ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions for inputs ``x`` ``(..., N, d)``; ``(K, N)`` with replicas."""
        return F.predict(self.W, self.a, x)

    # -- the plug-ins' contract (lightning_lnsgd.protocol.MultiStepModule) ---------------------
    @property
    def runs_sam_step(self) -> bool:
        """True on the fused path: it runs SAM itself with the SAM strategy's ``rho``/``normalize``."""
        return self.fused

    def step_layout(self) -> StepLayout | None:
        """Batch layout of the fused path: the replica seeds (or ``None``) and the SGD steps of this batch.

        The datamodule and :class:`~lightning_lnsgd.LabelNoise` shape their draws by it; ``None`` on the
        generic path (plain ``(x, y)`` batches). Under DDP it holds this rank's block of replicas: their seeds,
        their indices in the sweep and the sweep's replica count.
        """
        if not self.fused:
            return None
        k = self.steps_per_batch
        trainer = trainer_of(self)
        if trainer is not None and trainer.max_steps > 0:
            k = max(1, min(k, trainer.max_steps - trainer.global_step))
        if self.shard is not None:  # this rank's block of replicas; their streams stay their own
            block = self.shard.block
            return StepLayout(tuple(self.replica_seeds[block]), k, self.shard.index, self.shard.replicas)
        return StepLayout(None if self.replica_seeds is None else tuple(self.replica_seeds), k)

    def grid_column(self, name: str) -> list[float] | None:
        """The value of grid axis ``name`` for each replica (:class:`~lightning_lnsgd.protocol.GridModule`), ``None``
        without a grid or that axis; the ``seed`` column holds the replicas' seeds."""
        if self.grid is None or name not in self.grid:
            return None
        if name == "seed":
            return list(self.replica_seeds or ())
        return list(self.grid[name])

    def replica_settings(self) -> list[dict[str, float | int]] | None:
        """What each stacked replica runs with (:meth:`~lightning_lnsgd.protocol.MultiStepModule.replica_settings`), ``None`` without
        replicas: its ``seed``, step size ``lr`` η in force, ``init_scale`` α and, when attached, the
        :class:`~lightning_lnsgd.LabelNoise` level (``sigma`` σ, or ``flip_prob``) and the SAM strategy's ``rho`` ρ."""
        if self.replica_seeds is None:
            return None
        K = len(self.replica_seeds)
        rates = self.lr_per_replica.tolist()
        rows: list[dict[str, float | int]] = [
            {"seed": seed, "lr": float(rates[k]), "init_scale": self.init_scales[k]}
            for k, seed in enumerate(self.replica_seeds)
        ]
        trainer = trainer_of(self)
        if trainer is None:
            return rows
        for cb in trainer.callbacks:
            if isinstance(cb, LabelNoise):
                levels = cb.sigma if isinstance(cb.sigma, list) and cb.kind != "flip" else [cb.level] * K
                for row, level in zip(rows, levels):
                    row[cb.level_name] = float(level)
        sam = sam_settings(trainer.strategy)
        if sam is not None:
            for row, rho in zip(rows, sam[0] if isinstance(sam[0], list) else [sam[0]] * K):
                row["rho"] = float(rho)
        return rows

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.fused:
            assert self._engine is not None
            self._engine.run(x, y)
            # Before the callbacks' on_train_batch_end, so that a progress bar shows this step's loss.
            self._engine.flush()
            return None
        loss = F.half_mse(self.W, self.a, x, y)
        if loss.device.type == "cpu" and not torch.isfinite(loss):  # free on CPU; on GPU checked periodically
            self.recorder.raise_divergence(self.global_step + 1)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = F.half_mse(self.W, self.a, x.to(self.W.dtype), y.to(self.W.dtype)).mean()
        # Lightning would log at its batch counter; during fit the loggers get it at the SGD step
        # (on_validation_epoch_end), so that it lines up with the dynamics tags on the fused path too.
        self.log("val/loss", loss, logger=self.trainer.state.fn != "fit")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and "val/loss" in self.trainer.callback_metrics:
            self.recorder.log_scalars({"val/loss": float(self.trainer.callback_metrics["val/loss"])}, self.global_step)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Predictions ŷ for the inputs of ``batch`` (a tensor or a tuple whose first item is x)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x.to(self.W.dtype))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", F.half_mse(self.W, self.a, x.to(self.W.dtype), y.to(self.W.dtype)).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        if self.fused:
            return None  # the fused engine updates the weights itself
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.0, weight_decay=0.0)

    # -- lifecycle -----------------------------------------------------------------------------
    def configure_callbacks(self) -> list:
        # The earliest hook of a fit with the trainer attached: Lightning checks gradient clipping against manual
        # optimisation before `setup`, with a message that does not name the generic path.
        if self.fused and self.trainer.state.fn == "fit":
            engine.refuse_unsupported_settings(self, self.trainer)
        # Stacked replicas: their own TensorBoard runs (closed at the end of fit and on an exception) and the results
        # table.
        if self.replica_seeds is None:
            return []
        return [self.recorder.replica_runs, ReplicaTable(self)]

    #: Lightning's start-up warnings that misdescribe the fused path, which has no torch optimizer by design and counts
    #: ``log_every_n_steps`` in SGD steps, not in batches; silenced during its fits only.
    FUSED_PATH_MISREADINGS = (
        r"`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer",
        r"The number of training batches \(\d+\) is smaller than the logging interval",
    )

    def setup(self, stage: str) -> None:
        if self.fused and stage == "fit":
            for message in self.FUSED_PATH_MISREADINGS:
                warnings.filterwarnings("ignore", message=message)
        self.shard = None
        world = self.trainer.world_size
        if not (self.fused and stage == "fit" and world > 1):
            return
        # Checked before the strategy wraps the module: DDP would fail first, with a less useful message.
        strategy = self.trainer.strategy
        if not isinstance(strategy, pl.strategies.DDPStrategy):  # e.g. FSDP would shard W itself
            raise ValueError(
                f"TwoLayerLinear: the fused path shards its replicas with DDP; got strategy {type(strategy).__name__}: "
                "use strategy ddp (or sam_ddp), or backend='autograd'."
            )
        K = self.replicas
        if K is None or K < world:
            raise ValueError(
                f"TwoLayerLinear: the fused path shards its replicas over the ranks, one block each; replicas={K!r} "
                f"with world_size={world}: use replicas >= {world}, fewer devices, or backend='autograd' (data-parallel "
                "DDP of one network)."
            )
        self.shard = ReplicaShard(K, world, self.trainer.global_rank)
        warnings.filterwarnings("ignore", message=self.SHARDED_MISREADING)

    #: With sharded replicas every rank validates the whole test set on the full, identical stack: there is nothing to
    #: accumulate across ranks (and a cross-rank mean of equal values may round), so Lightning's advice misleads.
    SHARDED_MISREADING = r"It is recommended to use `self\.log\('val/loss', \.\.\., sync_dist=True\)`"

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # the filters must not hide these warnings from other modules' fits in this process
            ours = (*self.FUSED_PATH_MISREADINGS, self.SHARDED_MISREADING)
            warnings.filters[:] = [f for f in warnings.filters
                                   if not (f[0] == "ignore" and getattr(f[1], "pattern", None) in ours)]

    def on_fit_start(self) -> None:
        self._check_grid_used()
        dm = getattr(self.trainer, "datamodule", None)
        teacher = getattr(dm, "teacher", None)
        if teacher is not None:
            if teacher.shape[-1] != self.W.shape[-1]:
                raise ValueError(
                    f"TwoLayerLinear: the datamodule's teacher has dimension {teacher.shape[-1]} "
                    f"but the model was built with dim={self.W.shape[-1]}."
                )
            self.teacher = teacher.to(self.device, self.W.dtype)
        if self.fused:
            self._engine = engine.FusedEngine(self)

    def _check_grid_used(self) -> None:
        """Refuses a grid axis of a plug-in (σ, ρ) that no plug-in of the fit takes: its replicas would not differ."""
        if self.grid is None:
            return
        settings = self.replica_settings() or []
        for name, owner in (("sigma", "LabelNoise(sigma='grid')"), ("rho", "the SAM strategy with rho='grid'")):
            if name in self.grid and [row.get(name) for row in settings] != self.grid[name]:
                raise ValueError(
                    f"TwoLayerLinear: `grid` has a `{name}` axis, but no plug-in of this fit takes it; attach {owner},"
                    f" or remove the axis."
                )

    def on_train_start(self) -> None:
        if self.global_step == 0:
            self.recorder.log_dynamics(0)
            settings = self.replica_settings()
            if settings is not None:  # each replica's settings, for the escape-vs-σ (η, α) report
                rows = {k: {f"replica/{name}": float(v) for name, v in row.items()} for k, row in enumerate(settings)}
                self.recorder.log_scalars({}, 0, rows)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.fused:
            return  # the engine logged in training_step
        step, recorder = self.global_step, self.recorder
        if step % recorder.escape_every() == 0:
            recorder.check_finite(step)
            recorder.update_escape(step)
            recorder.log_new_escapes()
        every = self.trainer.log_every_n_steps
        if every > 0 and step % every == 0:
            recorder.log_dynamics(step)

    # -- resume ---------------------------------------------------------------------------------
    #: Arguments a resume may not change: they define the network, its initialisation and its random streams,
    #: which the checkpoint holds.
    FIXED_ON_RESUME = (
        "dim", "width", "init", "init_scale", "seed", "replicas", "replica_seeds", "steps_per_batch", "grid"
    )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume: the constructor's ``lr`` wins over the checkpoint's, with a warning; a changed shape is an error.

        A smaller step to continue with is a common wish, so ``lr`` may change: the ``lr_per_replica`` buffer and,
        on the generic path, the SGD optimizer take the new value before Lightning restores them, and logged
        hyper-parameters and divergence messages carry it. The arguments of :attr:`FIXED_ON_RESUME` and a switch
        between the generic and the fused path raise a ``ValueError`` naming the argument and both values. A
        checkpoint that holds ``W0`` (older releases wrote it) must hold the one the arguments rebuild.
        """
        saved = checkpoint.get("hyper_parameters") or {}
        for name in self.FIXED_ON_RESUME:
            if name in saved and saved[name] != self.hparams[name]:
                raise ValueError(
                    f"TwoLayerLinear: resuming with {name}={self.hparams[name]!r}, but the checkpoint was trained with "
                    f"{name}={saved[name]!r}; a resume cannot change `{name}`: resume with {name}={saved[name]!r} "
                    "or start a new run."
                )
        state = checkpoint.get("state_dict", {})
        # Replicas and steps_per_batch are equal by now: the backend alone decides whether the path changes.
        saved_fused = _fused(saved.get("backend"), self.replicas, self.steps_per_batch)
        if "backend" in saved and saved_fused != self.fused:
            raise ValueError(
                f"TwoLayerLinear: resuming with backend={self.hparams.backend!r} (the {'fused' if self.fused else 'generic'}"
                f" path), but the checkpoint was written by the {'fused' if saved_fused else 'generic'} path "
                f"(backend={saved['backend']!r}); resume with backend={saved['backend']!r}."
            )
        saved_W0 = state.pop("W0", None)  # written by releases that checkpointed it
        if saved_W0 is not None and not torch.equal(saved_W0.cpu(), self.W0.cpu()):
            raise ValueError(
                "TwoLayerLinear: the checkpoint's initial weights W0 differ from those this model's arguments give "
                "(the initialisation changed between the release that wrote it and this one); start a new run."
            )
        old = state.get("lr_per_replica")
        if old is not None and not torch.equal(old.cpu(), self.lr_per_replica.cpu()):
            rank_zero_warn(
                f"TwoLayerLinear: resuming with lr={self.hparams.lr!r} (the value asked for); the checkpoint was trained"
                f" with lr={saved.get('lr', old.tolist())!r}. Training continues at lr={self.hparams.lr!r}."
            )
            state["lr_per_replica"] = self.lr_per_replica.detach().clone().to(old.device)
            for optimizer_state in checkpoint.get("optimizer_states") or []:
                for group in optimizer_state.get("param_groups", []):
                    group["lr"] = float(self.hparams.lr)  # the generic path: one unstacked network, one rate

    # -- measurements (see recorder.py) ---------------------------------------------------------
    @torch.no_grad()
    def dynamics(self, W: torch.Tensor | None = None, a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Values of every logged tag (``dynamics/*``, ``train/loss``, ``test/loss``), on device.

        Of the current weights by default, else of ``W`` and ``a`` (extra leading axes allowed, e.g. snapshots).
        With replicas each value has shape ``(…, K)``.
        """
        return self.recorder.values(self.W if W is None else W, self.a if a is None else a)


def _fused(backend: str | None, replicas: int | None, steps_per_batch: int) -> bool:
    """Whether a TwoLayerLinear with these arguments runs the fused path (see its ``backend`` argument)."""
    return backend != "autograd" and not (backend == "auto" and replicas is None and steps_per_batch == 1)


def _replica_list(seeds: Sequence[int] | None, K: int, seed: int) -> list[int]:
    if seeds is None:
        return [seed + r for r in range(K)]
    if len(seeds) != K:
        raise ValueError(f"TwoLayerLinear: `replica_seeds` has {len(seeds)} entries but replicas={K}.")
    return [int(s) for s in seeds]


def _per_replica(name: str, value: float | Sequence[float], K: int | None) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * (K or 1)
    values = [float(v) for v in value]
    if K is None or len(values) != K:
        raise ValueError(
            f"TwoLayerLinear: `{name}` is a list of {len(values)} values; a list needs `replicas` equal to its "
            f"length (one value per replica), got replicas={K!r}."
        )
    return values
