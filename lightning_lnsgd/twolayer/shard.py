"""The replicas of a fused :class:`~lightning_lnsgd.TwoLayerLinear` sharded over the ranks of a distributed fit.

Every rank holds the whole stack (weights, initial weights, escape steps) and steps one contiguous block of the
replicas; after each Lightning step the ranks all-gather their blocks through the Lightning strategy, so that every
rank holds the full, identical state again (for checkpoints, validation and DDP's own buffer broadcast).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ReplicaShard"]


class ReplicaShard:
    """Which replicas one rank steps, and the all-gathers that rebuild full-stack tensors from every rank's block.

    The ``K`` replicas are split into ``world_size`` contiguous blocks as :func:`torch.tensor_split` splits
    ``0 … K−1`` (the first ``K mod N`` blocks one replica larger); rank ``r`` steps block ``r``.

    Args:
        replicas: ``K``, at least ``world_size``.
        world_size: ``N``, the number of ranks.
        rank: this process's global rank.
    """

    def __init__(self, replicas: int, world_size: int, rank: int) -> None:
        if not 1 <= world_size <= replicas or not 0 <= rank < world_size:
            raise ValueError(f"ReplicaShard: needs 1 <= world_size={world_size} <= replicas={replicas}, 0 <= rank={rank} < world_size.")
        self.replicas = replicas
        #: Replicas per rank.
        self.sizes = [len(b) for b in torch.arange(replicas).tensor_split(world_size)]
        start = sum(self.sizes[:rank])
        #: This rank's replicas, as a slice of the replica axis.
        self.block = slice(start, start + self.sizes[rank])
        # Lightning's all_gather calls a torch function that torch marks deprecated: a FutureWarning about Lightning's
        # internals on every rank, which the user can do nothing about.
        warnings.filterwarnings(
            "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated", category=FutureWarning
        )

    @property
    def index(self) -> tuple[int, ...]:
        """This rank's replicas, as indices in ``0 … K−1``."""
        return tuple(range(self.block.start, self.block.stop))

    def gather(self, module: Any, blocks: Sequence[torch.Tensor], dims: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """The full-stack tensors of this rank's ``blocks``, on every rank, in one collective.

        ``blocks[i]`` holds this rank's replicas along axis ``dims[i]``; its result holds all ``K`` replicas there, in
        order, with the block's dtype. The blocks travel as one ``dtype`` tensor (it must hold their values exactly),
        padded to the largest block, through ``module.all_gather`` (the Lightning strategy's all-gather).
        """
        rows = self.block.stop - self.block.start
        moved = [b.movedim(d, 0) for b, d in zip(blocks, dims)]
        flat = torch.cat([m.reshape(rows, -1).to(dtype) for m in moved], dim=1)
        width = max(self.sizes)
        if rows < width:  # an all-gather needs the same shape on every rank
            flat = torch.cat([flat, flat.new_zeros((width - rows, flat.shape[1]))])
        everyone = module.all_gather(flat)  # (N, width, columns)
        full = torch.cat([everyone[q, :n] for q, n in enumerate(self.sizes)])
        out, col = [], 0
        for b, m, d in zip(blocks, moved, dims):
            n = m[0].numel()
            out.append(full[:, col : col + n].reshape((self.replicas,) + tuple(m.shape[1:])).movedim(0, d).to(b.dtype))
            col += n
        return out
