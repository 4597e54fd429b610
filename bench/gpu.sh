#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, in four parts (torch, triton, transformers,
# pytest preinstalled on a lent machine; nothing to install):
#
#   bash bench/gpu.sh tests     # the test suite on CUDA (bf16 kernels, CUDA graphs, the tiny cascade)
#   bash bench/gpu.sh kernels   # bench/kernels.py, bench/train_step.py
#   bash bench/gpu.sh rollout   # bench/rollout.py: engine vs static-KV loop vs transformers, decode floor
#   bash bench/gpu.sh recipe    # the small recipe end to end: report.md, wall time
#   bash bench/gpu.sh rollout tests    # several parts in one call, in that order
#
# Seen on a fresh H100 machine (2026-11-22), Triton compiling and autotuning included: tests over
# 190 s with 8 xdist workers, kernels about 2 min, rollout about 2 min, recipe about 7 min.
#
# A task lent a GPU has 15 minutes of device time in all, the machine's start (a minute or more)
# included, and one command may run 10. So each part is cut at its own limit (seconds, below;
# LIMIT=<s> sets one for every part): a part that hangs, in a CUDA graph capture say, still leaves
# the parts after it their time, and `rollout tests` (at most 9 min) fits one call. Its log up to
# the cut is kept, and the exit status says 124.
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
limit() {   # run "$@" for at most this part's seconds, or $LIMIT's
    # timeout runs it in a process group of its own, so that the cut reaches its child processes
    # too (pytest's workers, torchrun's). A Ctrl-C reaches only our group, so it is passed on, as
    # a SIGTERM: a command started in the background ignores SIGINT
    local seconds=${LIMIT:-$1} pid rc; shift
    timeout -k 10 "$seconds" "$@" & pid=$!
    trap 'kill -TERM $pid 2>/dev/null' INT
    while kill -0 $pid 2>/dev/null; do wait $pid; done   # (a trapped signal ends a wait early)
    wait $pid; rc=$?
    trap - INT
    [ $rc -ne 124 ] || echo "gpu.sh: cut at its limit of $seconds s: $*"
    return $rc
}
trap 'exit 130' INT   # a Ctrl-C stops every part (once limit has passed it on)
status=0   # the first failing part's exit status; a failing part does not stop the next
for part in "$@"; do
case "$part" in
tests)
    # -v: one line per test as it finishes, so a log cut short still says how far it got;
    # --durations: where the time went (compiling and autotuning, mostly)
    par=$(python -c "import xdist" 2>/dev/null && echo "-n 8")              # where installed
    par="$par $(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150")"
    { header; limit 330 python -m pytest -v -rfE --durations=20 $par tests; } 2>&1 | tee "$out/tests.txt" ;;
kernels)
    { header
      limit 150 python bench/kernels.py; rc=$?
      limit 90 python bench/train_step.py || rc=$?
      exit $rc
    } 2>&1 | tee "$out/kernels.txt" ;;
rollout)
    { header; limit 240 python bench/rollout.py; } 2>&1 | tee "$out/rollout.txt" ;;
recipe)
    { header
      start=$(date +%s)
      limit 560 torchrun --standalone --nproc_per_node=1 cascade.py --recipe recipes/small.toml --run_dir /tmp/small
      rc=$?
      echo "wall time: $(( $(date +%s) - start )) s"
      cp /tmp/small/report.md /tmp/small/curves.png "$out/" 2>/dev/null   # (curves: with matplotlib)
      exit $rc
    } 2>&1 | tee "$out/recipe.txt" ;;
esac
rc=$?; [ $status -ne 0 ] || status=$rc
done
exit $status
