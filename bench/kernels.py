"""Benchmark the MoE kernels: grouped GEMM forward/backward and routing, side by side.

    python bench/kernels.py                 # on a GPU: Qwen3-30B-A3B-like and small shapes
    python bench/kernels.py --cpu-smoke     # tiny shapes on a CPU (Triton under its interpreter)

Grouped GEMM rows, all on the same inputs (x_sorted [M, hidden] bf16, w [E, hidden, width] bf16):
    triton            kernels.grouped_mm_triton on pre-gathered rows
    triton+gather     the same with the row gather fused into the loads (what model.py runs),
                      on the raw (unpadded) routing offsets; its dx sums each token's copies
                      through routing's unsort_idx (copies_N_K), as model.py does
    torch._grouped_mm PyTorch's CUTLASS grouped GEMM (bf16, sm90); the speed reference
    dense matmul      one [M, hidden] @ [hidden, width] matmul: the same FLOPs, no grouping
    python loop       kernels.grouped_mm_reference, one matmul per expert
Backward = dX and dW (2x the forward FLOPs). torch._grouped_mm's backward is written out as its two
grouped GEMMs. Group sizes come from real routing of random logits; they are rounded up to
multiples of 8 rows because torch._grouped_mm's dW (offsets along the reduced dimension) needs
16-byte aligned offsets for bf16 TMA loads. Every implementation gets those same offsets.
Results are checked against the fp32 reference before anything is timed. Times: CUDA events after
warmup (which also runs Triton's autotuning), median of --reps.
"""
import argparse
import os
import statistics
import sys
import time

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (automatic without CUDA)")
parser.add_argument("--reps", type=int, default=20, help="timed repetitions per entry (median reported)")
parser.add_argument("--only", choices=["gemm", "route"], help="time only the grouped GEMM or only routing")
args = parser.parse_args()
CPU = args.cpu_smoke or not torch.cuda.is_available()
if CPU:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.grouped_gemm import grouped_mm_reference, grouped_mm_triton  # noqa: E402
from kernels.routing import route_reference, route_triton  # noqa: E402

DEVICE = "cpu" if CPU else "cuda"
SHAPES = {  # tokens, hidden, expert width, experts, top-k
    "qwen3-30b-a3b": (16384, 2048, 768, 128, 8),
    "small": (16384, 512, 1024, 8, 2),
}
if CPU:
    SHAPES = {"tiny": (48, 32, 48, 8, 2)}
    args.reps = min(args.reps, 3)


def timeit(fn) -> float:
    """Median milliseconds per call."""
    for _ in range(1 if CPU else 5):
        fn()
    times = []
    for _ in range(args.reps):
        if CPU:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def torch_grouped_mm_fns(xs, w, dy, offsets):
    """torch._grouped_mm forward and backward, or None where this torch lacks it. Its `offs` are
    the int32 cumulative end offsets of the E groups (our offsets_E1 without the leading 0)."""
    gmm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if gmm is None:
        return None, None
    offs = offsets[1:].to(torch.int32)
    fwd = lambda: gmm(xs, w, offs=offs)
    bwd = lambda: (gmm(dy, w.transpose(-2, -1), offs=offs), gmm(xs.t(), dy, offs=offs))
    try:
        fwd(), bwd()
    except (RuntimeError, NotImplementedError) as e:  # e.g. no kernel for this device
        print(f"  torch grouped_mm unavailable here: {str(e).splitlines()[0][:90]}")
        return None, None
    return fwd, bwd


def bench_shape(name, tokens, hidden, width, E, K, rows):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(tokens, E, device=DEVICE, generator=g)
    if args.only != "route":
        bench_grouped_mm(name, tokens, hidden, width, E, K, rows, logits, g)
    if args.only != "gemm":
        bench_route(name, K, rows, logits)


def bench_grouped_mm(name, tokens, hidden, width, E, K, rows, logits, g):
    dt = torch.bfloat16
    r = route_triton(logits, K, True)
    counts = (r.counts_E + 7) // 8 * 8  # aligned group sizes for torch._grouped_mm (see top)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    M = int(offsets[-1])
    xs = torch.randn(M, hidden, device=DEVICE, dtype=dt, generator=g)
    w = (torch.randn(E, hidden, width, device=DEVICE, generator=g) / hidden**0.5).to(dt)
    dy = torch.randn(M, width, device=DEVICE, dtype=dt, generator=g)
    x_tok = torch.randn(tokens, hidden, device=DEVICE, dtype=dt, generator=g)
    gather_idx = r.sort_idx // K  # token of each expert-sorted copy

    xs_g, w_g = xs.detach().requires_grad_(), w.detach().requires_grad_()
    y = grouped_mm_triton(xs_g, w_g, offsets)
    ours_bwd = lambda: torch.autograd.grad(y, (xs_g, w_g), dy, retain_graph=True)
    xt_g = x_tok.detach().requires_grad_()
    yg = grouped_mm_triton(xt_g, w_g, r.offsets_E1, gather_idx, r.unsort_idx.view(tokens, K))  # as model.py
    gather_bwd = lambda: torch.autograd.grad(yg, (xt_g, w_g), dy[: yg.shape[0]], retain_graph=True)
    tg_fwd, tg_bwd = torch_grouped_mm_fns(xs, w, dy, offsets)

    # Correctness first: fp32 reference with the same bf16 inputs.
    x32, w32 = xs.float().requires_grad_(), w.float().requires_grad_()
    y32 = grouped_mm_reference(x32, w32, offsets)
    dx32, dw32 = torch.autograd.grad(y32, (x32, w32), dy.float())
    dx, dw = ours_bwd()
    errs = dict(y=rel_err(y, y32), dx=rel_err(dx, dx32), dw=rel_err(dw, dw32),
                y_gather=rel_err(yg, grouped_mm_reference(x_tok.float(), w32, r.offsets_E1, gather_idx)))
    if tg_fwd is not None:
        errs["torch_grouped_mm_y"] = rel_err(tg_fwd(), y32)
    print(f"{name}: M={M} rows, relative error vs fp32 reference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(v < 2e-2 for v in errs.values()), f"{name}: results do not match the reference"

    flops = 2 * M * hidden * width
    dense_x, dense_w = xs.detach().requires_grad_(), w[0].detach().requires_grad_()
    dense_y = dense_x @ dense_w
    loop_x, loop_w = xs.detach().requires_grad_(), w.detach().requires_grad_()
    loop_y = grouped_mm_reference(loop_x, loop_w, offsets)
    entries = [
        ("fwd", "triton", lambda: grouped_mm_triton(xs, w, offsets)),
        ("fwd", "triton+gather", lambda: grouped_mm_triton(x_tok, w, r.offsets_E1, gather_idx)),
        ("fwd", "torch._grouped_mm", tg_fwd),
        ("fwd", "dense matmul", lambda: xs @ w[0]),
        ("fwd", "python loop", lambda: grouped_mm_reference(xs, w, offsets)),
        ("bwd", "triton", ours_bwd),
        ("bwd", "triton+gather", gather_bwd),
        ("bwd", "torch._grouped_mm", tg_bwd),
        ("bwd", "dense matmul", lambda: torch.autograd.grad(dense_y, (dense_x, dense_w), dy, retain_graph=True)),
        ("bwd", "python loop", lambda: torch.autograd.grad(loop_y, (loop_x, loop_w), dy, retain_graph=True)),
    ]
    ms = {(p, impl): timeit(fn) for p, impl, fn in entries if fn is not None}
    for p, impl, fn in entries:
        if fn is None:
            rows.append((name, p, impl, "n/a", "n/a", "n/a"))
            continue
        f = flops * (tokens * K / M if impl == "triton+gather" else 1) * (2 if p == "bwd" else 1)
        ref = ms.get((p, "torch._grouped_mm"))
        vs = f"{ref / ms[p, impl]:.2f}x" if ref else "n/a"
        rows.append((name, p, impl, f"{ms[p, impl]:.3f}", f"{f / ms[p, impl] / 1e9:.3g}", vs))


def bench_route(name, K, rows, logits):
    """The fused kernels against softmax + topk + argsort + bincount in torch, after checking that
    they choose the same experts (up to last-ulp ties between the two softmaxes) and that their
    permutation sorts the copies by expert."""
    ours, ref = route_triton(logits, K, True), route_reference(logits, K, True)
    differ = (ours.experts_N_K != ref.experts_N_K).any(-1).float().mean().item()
    flat = ours.experts_N_K.flatten()
    assert differ < 1e-3, f"{name}: routing picks other experts for {differ:.2%} of tokens"
    assert torch.equal(ours.sort_idx[ours.unsort_idx], torch.arange(flat.numel(), device=flat.device))
    assert torch.equal(flat[ours.sort_idx], flat.sort(stable=True).values), f"{name}: copies not sorted"
    assert torch.equal(ours.counts_E, torch.bincount(flat, minlength=logits.shape[1]))
    print(f"{name}: routing checked (experts differ from torch's for {differ:.4%} of tokens)")
    t_ours, t_ref = timeit(lambda: route_triton(logits, K, True)), timeit(lambda: route_reference(logits, K, True))
    rows.append((name, "route", "triton", f"{t_ours:.3f}", "-", f"{t_ref / t_ours:.2f}x vs torch"))
    rows.append((name, "route", "torch reference", f"{t_ref:.3f}", "-", "1.00x"))


def main():
    dev = "CPU (Triton interpreter: timings mean nothing)" if CPU else torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, reps {args.reps}")
    rows = []
    for name, shape in SHAPES.items():
        bench_shape(name, *shape, rows)
    header = ("shape", "pass", "implementation", "ms", "TFLOP/s", "vs torch._grouped_mm")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
