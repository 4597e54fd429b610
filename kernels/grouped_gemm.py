"""Grouped GEMM for mixture-of-experts layers, in Triton, next to its plain-torch reference.

After routing (kernels/routing.py) the token copies are sorted by expert: rows
offsets[e]:offsets[e+1] of X [M, K] belong to expert e, whose weight is W[e] [K, N]. The grouped
GEMM computes every expert's product in one launch:

    Y[offsets[e]:offsets[e+1]] = X[offsets[e]:offsets[e+1]] @ W[e]          for e in range(E)

With `gather_idx` the rows are X = x[gather_idx], read straight from the token activations inside
the kernel, so the [M, K] copy of gathered rows is never written to memory.

Backward, two more grouped GEMMs:
    dX_e = dY_e @ W[e]^T   the forward kernel again, on W viewed transposed (strides, no copy);
                           with gather_idx each token sums the gradients of its copies: given
                           `copies_N_K` (routing's unsort_idx: the rows of token t's K copies) as
                           dx = dX[copies_N_K].sum(1), a gather, deterministic, summed in fp32;
                           else dx = zeros.index_add_(0, gather_idx, dX), atomic adds. On the H100
                           the atomic version made the backward 2.5x slower (bench/RESULTS.md).
    dW_e = X_e^T @ dY_e    `_grouped_dw_kernel`: one [BLOCK_M, BLOCK_N] tile of dW per program,
                           reducing over the (ragged) rows of its expert; empty experts get dW = 0.

Schedule. Groups are ragged (and some empty), so a fixed grid of programs, one or two per SM,
walks a flat list of output tiles: group 0's tiles, then group 1's, ... Program p takes tiles p,
p + P, p + 2P, ... ("persistent" kernel, as in the Triton grouped-GEMM tutorial). The tile list is
never materialized: each program walks the group offsets and skips the tiles of other programs.
This needs no host sync on the group sizes (they live on the GPU) and leaves no program idle
because a group happened to be small. Tile shapes come from a small autotune list per (N, K) and
size class of M (small decode steps, large ones, prefill and training), so a decode step's few rows
per expert and a training step's thousands each get their own.
Inputs are bf16 (or fp32), accumulation is always fp32.
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


# ---------------------------------------------------------------------------------------------
# Reference: a Python loop over experts. Also the differentiable CPU path of the model.

def grouped_mm_reference(x_M_K: Tensor, w_E_K_N: Tensor, offsets_E1: Tensor,
                         gather_idx_M: Tensor | None = None) -> Tensor:
    xs = x_M_K if gather_idx_M is None else x_M_K[gather_idx_M]
    bounds = offsets_E1.tolist()
    outs = [xs[bounds[e]:bounds[e + 1]] @ w_E_K_N[e] for e in range(w_E_K_N.shape[0])]
    return torch.cat(outs) if outs else xs.new_zeros(0, w_E_K_N.shape[2])


# ---------------------------------------------------------------------------------------------
# Configs. On the GPU autotune picks one per (N, K, M's size class) the first time it sees one, of
# those whose accumulators fit in registers (with SwiGLU's two, two of these tiles would spill). Under
# the interpreter (TRITON_INTERPRET=1, tests on a CPU) one small config: every program costs ~1 ms.

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if _interpreting():
    _CONFIGS = [triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, PER_SM=1))]
else:  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, pipeline stages, programs per SM)
    _CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PER_SM=p), num_warps=w,
                              num_stages=s)
                for bm, bn, bk, w, s, p in [(128, 128, 64, 8, 3, 1), (128, 256, 64, 8, 3, 1),
                                            (128, 128, 64, 4, 4, 1), (64, 128, 64, 4, 4, 2),
                                            (128, 64, 64, 4, 4, 2), (64, 64, 64, 4, 3, 2),
                                            (64, 256, 32, 8, 4, 1)]]


def _fits_registers(configs, named_args, **kwargs):
    """The tiles whose fp32 accumulators (SwiGLU: two) fit in 128 of the 255 registers a thread may
    hold; ptxas spills larger ones to local memory."""
    tiles = 2 if kwargs.get("SWIGLU") else 1
    return [c for c in configs if tiles * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 32 * c.num_warps]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, so the tile walk is still exercised


# ---------------------------------------------------------------------------------------------
# Forward (and dX): Y[rows of group g] = A[rows] @ B[g], tile by tile.

@triton.autotune(configs=_CONFIGS, key=["N", "K", "SWIGLU", "M_CLASS"],
                 prune_configs_by=dict(early_config_prune=_fits_registers))
@triton.jit
def _grouped_mm_kernel(a_ptr, b_ptr, y_ptr, offsets_ptr, gather_ptr, E,
                       M_CLASS,  # M <= 512: 0, <= 4096: 1, else 2; only autotune's key reads it
                       stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_ym,
                       N: tl.constexpr, K: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr,
                       PRECISION: tl.constexpr, FP32_MATH: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PER_SM: tl.constexpr):  # PER_SM only sizes the grid (see _grouped_mm)
    tile = tl.program_id(0)  # the next tile of the flat list this program will compute
    P = tl.num_programs(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first = 0  # index of group g's first tile in the flat list
    g = tl.full((), 0, tl.int32)
    end = tl.load(offsets_ptr).to(tl.int32)  # int32 row indices: loop-carried types stay fixed
    while g < E:
        start = end
        end = tl.load(offsets_ptr + g + 1).to(tl.int32)
        tiles_g = tl.cdiv(end - start, BLOCK_M) * tiles_n  # 0 for an empty expert
        # Inside a group the n-tiles of one row block are neighbours in the list, so programs
        # running at the same time share the same A rows (and the group's B) in L2.
        while tile < first + tiles_g:
            local = tile - first
            rows = start + (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < end  # ragged group: the last row block is partial
            src = rows
            if GATHER:  # fused row gather: A row i is x[gather_idx[i]]
                src = tl.load(gather_ptr + rows, mask=row_ok, other=0)
            a_rows = a_ptr + src.to(tl.int64)[:, None] * stride_am
            b_cols = b_ptr + g.to(tl.int64) * stride_be + cols[None, :] * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N) if SWIGLU else (1, 1), dtype=tl.float32)
            # K is constexpr: a `for` loop with a static trip count, which Triton software-
            # pipelines (num_stages loads in flight) on the GPU.
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_rows + ks[None, :] * stride_ak,
                            mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
                b_ok = (ks[:, None] < K) & (cols[None, :] < N)
                b = tl.load(b_cols + ks[:, None] * stride_bk, mask=b_ok, other=0.0)
                if FP32_MATH:  # the interpreter's bf16 arithmetic is wrong: compute in fp32
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                if SWIGLU:  # the same rows times the up half of W[g], columns N + cols
                    b_up = tl.load(b_cols + N * stride_bn + ks[:, None] * stride_bk, mask=b_ok, other=0.0)
                    if FP32_MATH:
                        b_up = b_up.to(tl.float32)
                    acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
            if SWIGLU:  # silu(gate) * up, in fp32, before the one rounding of the store
                acc = acc * tl.sigmoid(acc) * acc_up
            y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))
            tile += P
        first += tiles_g
        g += 1


def _grouped_mm(a: Tensor, b_E_K_N: Tensor, offsets_E1: Tensor, gather_idx: Tensor | None,
                swiglu: bool = False) -> Tensor:
    """Y [M, N] = grouped A @ B; A rows are a[gather_idx] when given (then M = len(gather_idx)).
    swiglu: B is [gate | up], 2N columns, and Y = silu(A @ gate) * (A @ up)."""
    E, K, N = b_E_K_N.shape
    M = a.shape[0] if gather_idx is None else gather_idx.shape[0]
    N = N // 2 if swiglu else N
    y = torch.empty(M, N, device=a.device, dtype=a.dtype)
    if M == 0:
        return y
    sms = _num_sms(a.device)
    # One (or, for small tiles, two) programs per SM, but never more than an upper bound on the
    # tile count (each group adds at most one partial row block): no host sync on the sizes.
    grid = lambda meta: (min(sms * meta["PER_SM"], (triton.cdiv(M, meta["BLOCK_M"]) + E)
                             * triton.cdiv(N, meta["BLOCK_N"])),)
    _grouped_mm_kernel[grid](
        a, b_E_K_N, y, offsets_E1, gather_idx if gather_idx is not None else offsets_E1, E,
        (M > 512) + (M > 4096),   # M's class (three: each costs one autotuning run)
        a.stride(0), a.stride(1), *b_E_K_N.stride(), y.stride(0), N=N, K=K,
        GATHER=gather_idx is not None, SWIGLU=swiglu, PRECISION=_precision(a), FP32_MATH=_interpreting())
    return y


def _precision(t: Tensor) -> str:
    # fp32 inputs follow torch's own matmul setting: true fp32 products by default, tf32 tensor-core
    # products where the user allowed them (torch.backends.cuda.matmul.allow_tf32, as the RL stages
    # do for their fp32 rollouts). The interpreter always computes exactly.
    if t.dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for bf16/fp16 inputs
    return "tf32" if t.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ---------------------------------------------------------------------------------------------
# dW[g] = X_g^T @ dY_g: the reduction runs over the rows of group g, which may be zero rows.

@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_dw_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, gather_ptr, E,
                       stride_xm, stride_xk, stride_dym, stride_dwe, stride_dwk,
                       N: tl.constexpr, K: tl.constexpr, GATHER: tl.constexpr,
                       PRECISION: tl.constexpr, FP32_MATH: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PER_SM: tl.constexpr):
    # Here the output tile is [BLOCK_M of K] x [BLOCK_N of N] and BLOCK_K rows are summed per step.
    # Every group has the same number of dW tiles, so the flat tile list is a plain index.
    tiles_k, tiles_n = tl.cdiv(K, BLOCK_M), tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    while tile < E * tiles_k * tiles_n:
        g = tile // (tiles_k * tiles_n)
        ks = (tile // tiles_n % tiles_k) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(offsets_ptr + g).to(tl.int32)
        end = tl.load(offsets_ptr + g + 1).to(tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # A `for` loop (not `while`) so that the GPU compiler pipelines it; its bound is known
        # only at run time (triton 3.6's interpreter with numpy >= 2.4 fails here; 3.9 does not).
        for r0 in range(start, end, BLOCK_K):
            rows = r0 + tl.arange(0, BLOCK_K)
            row_ok = rows < end
            src = rows
            if GATHER:
                src = tl.load(gather_ptr + rows, mask=row_ok, other=0)
            xt = tl.load(x_ptr + src.to(tl.int64)[None, :] * stride_xm + ks[:, None] * stride_xk,
                         mask=row_ok[None, :] & (ks[:, None] < K), other=0.0)  # X_g^T tile
            dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :],
                         mask=row_ok[:, None] & (cols[None, :] < N), other=0.0)
            if FP32_MATH:
                xt, dy = xt.to(tl.float32), dy.to(tl.float32)
            acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
        dw = dw_ptr + g.to(tl.int64) * stride_dwe + ks[:, None] * stride_dwk + cols[None, :]
        tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))
        tile += tl.num_programs(0)


def _grouped_dw(x: Tensor, dy: Tensor, offsets_E1: Tensor, gather_idx: Tensor | None,
                E: int) -> Tensor:
    K, N = x.shape[1], dy.shape[1]
    dw = torch.empty(E, K, N, device=dy.device, dtype=dy.dtype)
    sms = _num_sms(dy.device)
    grid = lambda meta: (min(sms * meta["PER_SM"],
                             E * triton.cdiv(K, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
    _grouped_dw_kernel[grid](
        x, dy, dw, offsets_E1, gather_idx if gather_idx is not None else offsets_E1, E,
        x.stride(0), x.stride(1), dy.stride(0), dw.stride(0), dw.stride(1), N=N, K=K,
        GATHER=gather_idx is not None, PRECISION=_precision(x), FP32_MATH=_interpreting())
    return dw


# ---------------------------------------------------------------------------------------------
# autograd: forward, dX and dW are all grouped GEMMs.

class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets_E1, gather_idx, copies_N_K):
        ctx.save_for_backward(x, w, offsets_E1, gather_idx, copies_N_K)
        return _grouped_mm(x, w, offsets_E1, gather_idx)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets_E1, gather_idx, copies_N_K = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dX = dY @ W^T per group: the forward kernel with B = W viewed [E, N, K].
            dx = _grouped_mm(dy, w.transpose(1, 2), offsets_E1, None)
            if copies_N_K is not None:    # each token collects the gradients of its K copies
                dx = dx[copies_N_K].sum(1, dtype=torch.float32).to(x.dtype)
            elif gather_idx is not None:  # any gather: the same sum, by atomic adds
                dx = torch.zeros_like(x).index_add_(0, gather_idx, dx)
        if ctx.needs_input_grad[1]:
            dw = _grouped_dw(x, dy, offsets_E1, gather_idx, w.shape[0])
        return dx, dw, None, None, None


def _autocast(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    if torch.is_autocast_enabled(x.device.type):  # a Triton kernel is invisible to autocast
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    return x, w.to(x.dtype)


def grouped_mm_triton(x_M_K: Tensor, w_E_K_N: Tensor, offsets_E1: Tensor,
                      gather_idx_M: Tensor | None = None, copies_N_K: Tensor | None = None) -> Tensor:
    """copies_N_K (optional, with gather_idx): row n lists the rows i with gather_idx[i] == n, every
    token the same number of times, as routing's unsort_idx.view(N, K) does. It only changes how
    the backward sums each token's gradient (see the top of the file)."""
    assert x_M_K.dim() == 2 and w_E_K_N.dim() == 3 and x_M_K.shape[1] == w_E_K_N.shape[1], \
        f"grouped_mm: x {tuple(x_M_K.shape)} and w {tuple(w_E_K_N.shape)} need x [M, K], w [E, K, N]"
    assert offsets_E1.shape == (w_E_K_N.shape[0] + 1,), \
        f"grouped_mm: offsets {tuple(offsets_E1.shape)} must be [E+1] = [{w_E_K_N.shape[0] + 1}]"
    x_M_K, w_E_K_N = _autocast(x_M_K, w_E_K_N)
    if copies_N_K is not None:
        assert gather_idx_M is not None and copies_N_K.shape[0] == x_M_K.shape[0] \
            and copies_N_K.numel() == gather_idx_M.shape[0], \
            f"grouped_mm: copies {tuple(copies_N_K.shape)} must be [tokens, copies per token] " \
            f"of the {gather_idx_M.shape[0] if gather_idx_M is not None else 0} gathered rows"
    return _GroupedMM.apply(x_M_K, w_E_K_N, offsets_E1, gather_idx_M, copies_N_K)


# ---------------------------------------------------------------------------------------------
# Inference: the experts' first GEMM with SwiGLU in its epilogue.

def grouped_swiglu_reference(x_N_K: Tensor, w_E_K_2I: Tensor, offsets_E1: Tensor, gather_idx_M: Tensor) -> Tensor:
    gate_M_I, up_M_I = grouped_mm_reference(x_N_K, w_E_K_2I, offsets_E1, gather_idx_M).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate_M_I) * up_M_I


def grouped_swiglu_triton(x_N_K: Tensor, w_E_K_2I: Tensor, offsets_E1: Tensor, gather_idx_M: Tensor) -> Tensor:
    """silu(X @ W_gate) * (X @ W_up) per group, W = [gate | up] along its last dim, X = x[gather_idx]:
    the forward kernel with two accumulators per tile, so that the [M, 2I] product is never written
    and the activation costs no kernels of its own. Forward only (no autograd): the backward would
    need the product it skips. In fp32 until one rounding, where the torch path rounds the product,
    the silu and the multiply each: bf16 results can differ in the last bit."""
    x, w = _autocast(x_N_K, w_E_K_2I)
    assert w.shape[2] % 2 == 0, f"grouped_swiglu: w {tuple(w.shape)} must be [E, K, 2I]"
    return _grouped_mm(x, w, offsets_E1, gather_idx_M, swiglu=True)
