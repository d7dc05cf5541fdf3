"""Helper for tests/test_metrics.py: every metric on two gloo ranks, results saved for the parent to compare.

Usage: python tests/_metrics_ddp.py PORT OUT_DIR. Each rank holds the same weights (as under DDP) and its own shard
of the data (unequal sizes); rank r writes OUT_DIR/rank{r}.pt with the synchronised ``compute()`` of every metric.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_lnsgd.metrics import HalfMSE, LazyDistance, NeuronAlignment, NeuronNorms, RelativeDistance, Sparsity

WORLD = 2


def make_inputs() -> dict[str, torch.Tensor]:
    """The weights (shared) and the union of the data; rank r takes ``preds[SPLITS[r]]``."""
    g = torch.Generator().manual_seed(123)
    return {
        "W": torch.randn(37, 11, generator=g),
        "W0": torch.randn(37, 11, generator=g),
        "v": torch.randn(11, generator=g),
        "preds": torch.randn(20, generator=g),
        "target": torch.randn(20, generator=g),
    }


SPLITS = (slice(0, 7), slice(7, 20))  # unequal shards: a mean of per-rank means would be wrong


def metrics(inp: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    return {
        "norms": NeuronNorms(),
        "alignment": NeuronAlignment(inp["v"]),
        "sparsity": Sparsity(),
        "relative": RelativeDistance(inp["W0"]),
        "lazy": LazyDistance(inp["W0"]),
        "loss": HalfMSE(),
    }


def run(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        inp = make_inputs()
        results = {}
        for name, metric in metrics(inp).items():
            if name == "loss":
                metric.update(inp["preds"][SPLITS[rank]], inp["target"][SPLITS[rank]])
            else:
                metric.update(inp["W"])
            results[name] = metric.compute()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    # fork: the children inherit the imports (spawn would re-import torch and Lightning in each, ~10 s)
    mp.start_processes(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True, start_method="fork")
