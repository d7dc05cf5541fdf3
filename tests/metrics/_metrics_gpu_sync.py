"""GPU check (not collected by pytest): metric ``update`` never synchronises the device with the host, and GPU values
equal CPU values. Run on a CUDA machine: ``PYTHONPATH=. python tests/_metrics_gpu_sync.py``.
"""
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("needs CUDA")
from lightning_lnsgd.metrics import HalfMSE, LazyDistance, NeuronAlignment, NeuronNorms, RelativeDistance, Sparsity
dev = torch.device("cuda")
W = torch.randn(1000, 20, device=dev); W0 = torch.randn(1000, 20, device=dev); v = torch.randn(20, device=dev)
ms = [NeuronNorms().to(dev), NeuronAlignment(v).to(dev), Sparsity().to(dev), RelativeDistance(W0).to(dev), LazyDistance(W0).to(dev)]
loss = HalfMSE().to(dev)
for m in ms: m.update(W)  # warm-up (allocations)
loss.update(W[:, 0], W0[:, 0])
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
for m in ms: m.update(W)
loss.update(W[:, 0], W0[:, 0])
torch.cuda.set_sync_debug_mode(0)
print("no sync in update: OK")
for m in ms + [loss]:
    out = m.compute(); cpu = type(m)(*( [v.cpu()] if isinstance(m, NeuronAlignment) else [W0.cpu()] if isinstance(m,(RelativeDistance,LazyDistance)) else []))
    if isinstance(m, HalfMSE): cpu.update(W[:,0].cpu(), W0[:,0].cpu())
    else: cpu.update(W.cpu())
    ref = cpu.compute()
    if isinstance(out, dict):
        for k in out: assert torch.allclose(out[k].cpu(), ref[k], rtol=1e-4, atol=1e-5), (type(m).__name__, k)
    else: assert torch.allclose(out.cpu(), ref, rtol=1e-4), type(m).__name__
print("GPU == CPU values: OK")
