#!/usr/bin/env bash
# Every GPU check and timing of the project in one command, for a machine with one CUDA GPU (≈ 5 min on an H200;
# each part has its own time limit, 560 s in all). CI never has a GPU: run it by hand, or through the project's
# device tool (one call, then give the machine back):
#
#     bash benchmarks/gpu_checks.sh [OUTDIR]      # logs and JSON in OUTDIR, else $OUT, else ./gpu_results
#
# Parts: the CUDA tests (triton kernels at paper size, the fused fit on the GPU, SAM on the GPU); the GPU scripts of
# tests/ (LabelNoise draws equal on CUDA and CPU; metric updates and the fused engine's steps never synchronise the
# host; CUDA fits equal CPU fits); benchmarks/kernels.py --gpu-only; benchmarks/throughput.py --device cuda (CUDA-graph
# anchor, 4096 replicas, triton fit); benchmarks/real_networks.py (the plug-ins' overhead on ResNet-18). Needs torch
# with CUDA, pytorch-lightning, torchmetrics, tensorboard and triton; not jsonargparse (no CLI run here).
set -uo pipefail
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
status=0
part() {  # part NAME SECONDS COMMAND...: runs COMMAND with a time limit, output to the terminal and OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
part gpu_tests 200 python -m pytest -q -p no:cacheprovider tests -m gpu
part kernel_tests 70 python -m pytest -q -p no:cacheprovider tests/twolayer/test_kernels.py tests/twolayer/test_engine.py \
    -k "triton or cuda"
part kernels 60 python benchmarks/kernels.py --gpu-only
part throughput 110 python benchmarks/throughput.py --device cuda
part real_networks 130 python benchmarks/real_networks.py --json "$out/real_networks.json"
exit $status
