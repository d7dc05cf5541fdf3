"""Worker of ``test_weights.py::test_ddp_two_ranks_equal_single_process``: every metric on two gloo ranks.

Usage: ``python tests/metrics/ddp_worker.py PORT OUT_DIR``. Each rank holds the same weights (as under DDP) and
writes OUT_DIR/rank{r}.pt with the synchronised ``compute()`` of every metric.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_lnsgd.metrics import (
    LazyDistance,
    NeuronAlignment,
    NeuronNorms,
    RelativeDistance,
    Sparsity,
)

WORLD = 2


def make_inputs() -> dict[str, torch.Tensor]:
    """The weights every rank holds, W(0) and the reference vector."""
    g = torch.Generator().manual_seed(123)
    return {"W": torch.randn(37, 11, generator=g), "W0": torch.randn(37, 11, generator=g), "v": torch.randn(11, generator=g)}


def metrics(inp: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    return {
        "norms": NeuronNorms(),
        "alignment": NeuronAlignment(inp["v"]),
        "sparsity": Sparsity(),
        "relative": RelativeDistance(inp["W0"]),
        "lazy": LazyDistance(inp["W0"]),
    }


def run(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        inp = make_inputs()
        results = {}
        for name, metric in metrics(inp).items():
            metric.update(inp["W"])
            results[name] = metric.compute()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    # fork: the children inherit the imports (spawn would re-import torch in each)
    mp.start_processes(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True, start_method="fork")
