#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, in four parts that each fit in one 10-minute
# call of a lent machine (torch, triton, transformers, pytest preinstalled; nothing to install):
#
#   bash bench/gpu.sh tests     # the test suite on CUDA (bf16 kernels, CUDA graphs, the tiny cascade)
#   bash bench/gpu.sh kernels   # bench/kernels.py, bench/train_step.py
#   bash bench/gpu.sh rollout   # bench/rollout.py: engine vs static-KV loop vs transformers, decode floor
#   bash bench/gpu.sh recipe    # the small recipe end to end: report.md, wall time
#   bash bench/gpu.sh rollout kernels   # several parts in one call, in that order
#
# Seen on a fresh H100 machine (2026-11-22), Triton compiling and autotuning included: tests over
# 190 s with 8 xdist workers, kernels about 2 min, rollout about 2 min, recipe about 7 min.
#
# Each part writes its whole log (and the recipe its report) to $OUT, or bench/out/ without it,
# headed by the device, versions, commit and date that bench/RESULTS.md records with every figure.
set -o pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

header() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
    # COMMIT=<hash> overrides git where the tree was copied without its current .git
    echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')} | $(date -u '+%Y-%m-%d %H:%M UTC')"
}

[ $# -gt 0 ] || set -- none
for part in "$@"; do   # check every part before running any
    case "$part" in
    tests|kernels|rollout|recipe) ;;
    *) echo "usage: bash bench/gpu.sh tests|kernels|rollout|recipe ..." >&2; exit 2 ;;
    esac
done
status=0   # the first failing part's exit status; a failing part does not stop the next
for part in "$@"; do
case "$part" in
tests)
    # -v: one line per test as it finishes, so a log cut short still says how far it got;
    # --durations: where the time went (compiling and autotuning, mostly)
    par=$(python -c "import xdist" 2>/dev/null && echo "-n 8")              # where installed
    par="$par $(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150")"
    { header; python -m pytest -v -rfE --durations=20 $par tests; } 2>&1 | tee "$out/tests.txt" ;;
kernels)
    { header
      python bench/kernels.py; rc=$?
      python bench/train_step.py || rc=$?
      exit $rc
    } 2>&1 | tee "$out/kernels.txt" ;;
rollout)
    { header; python bench/rollout.py; } 2>&1 | tee "$out/rollout.txt" ;;
recipe)
    { header
      start=$(date +%s)
      torchrun --standalone --nproc_per_node=1 cascade.py --recipe recipes/small.toml --run_dir /tmp/small
      rc=$?
      echo "wall time: $(( $(date +%s) - start )) s"
      cp /tmp/small/report.md /tmp/small/curves.png "$out/" 2>/dev/null   # (curves: with matplotlib)
      exit $rc
    } 2>&1 | tee "$out/recipe.txt" ;;
esac
rc=$?; [ $status -ne 0 ] || status=$rc
done
exit $status
