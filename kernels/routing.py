"""Fused top-k routing for a mixture-of-experts layer (and the weighted combine that undoes it), in
Triton, next to the plain-torch references.

A MoE layer sends each token to `top_k` of `E` experts. Routing turns the router logits [N, E] into
a `Routing` (its fields below): the softmax, the top-k weights and experts, and the permutation that
groups the N*K token copies by expert, so that each expert's rows are contiguous and one grouped
GEMM (kernels/grouped_gemm.py) does all experts, gathering each sorted row from its token (token_M).

Flat copy index j = token * K + k. The sort is stable, by expert then by j, so it is deterministic
and equal to `argsort(experts_N_K.flatten(), stable=True)`: given the same experts the Triton path
and the reference return identical integers. (Which experts: tied probabilities go to the lowest id
here, to any of them in `torch.topk`.)

Three kernels:
  1. `_topk_kernel`, one program per BLOCK_N tokens: softmax, top-k by K rounds of row-wise argmax
     (K is small, E fits one tile), renormalize, and a per-block histogram of the chosen experts.
  2. `_offsets_kernel`, one program: the histograms become offsets. Expert e's segment starts at
     offsets[e] (an exclusive cumsum over experts of the totals), and block b's copies of e start
     after those of blocks < b (an exclusive cumsum over blocks, started at offsets[e]).
  3. `_permute_kernel`, one program per block: a copy's rank among the block's copies of the same
     expert is a cumulative sum over a one-hot [copies, E] tile; its sorted position is base + rank,
     where the kernel also writes the copy's token (token_M, the grouped GEMM's row gather).
The kernels are forward-only (integers have no gradient); `_Route.backward` writes the gradient of
probs and weights w.r.t. the logits analytically, so the router trains through the fused path.

After the experts, `combine` goes the other way: each token sums its K rows of the expert output,
weighted (one kernel, `_combine_kernel`, with its backward in torch).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass
class Routing:
    weights_N_K: Tensor  # fp32 routing weights of the top-k experts (renormalized if norm_topk_prob)
    experts_N_K: Tensor  # int64 expert ids, in descending weight order
    probs_N_E: Tensor    # fp32 full softmax (for the load-balancing aux loss; carries grad to router)
    counts_E: Tensor     # int64 number of token copies per expert
    offsets_E1: Tensor   # int64 [E+1] exclusive prefix sum of counts (offsets[0]=0, offsets[E]=N*K)
    sort_idx: Tensor     # int64 [N*K]: row j of the expert-sorted copies is flat copy sort_idx[j]
    unsort_idx: Tensor   # int64 [N*K]: inverse permutation of sort_idx
    token_M: Tensor      # int64 [N*K]: the token of row j of the sorted copies (sort_idx // K)


# ---------------------------------------------------------------------------------------------
# Reference: what the kernels compute, in five lines of torch.

def route_reference(router_logits_N_E: Tensor, top_k: int, norm_topk_prob: bool) -> Routing:
    N, E = router_logits_N_E.shape
    probs_N_E = torch.softmax(router_logits_N_E.float(), dim=-1)
    weights_N_K, experts_N_K = torch.topk(probs_N_E, top_k, dim=-1)  # sorted, descending
    if norm_topk_prob:
        weights_N_K = weights_N_K / weights_N_K.sum(dim=-1, keepdim=True)
    flat = experts_N_K.flatten()
    sort_idx = torch.argsort(flat, stable=True)
    counts_E = torch.bincount(flat, minlength=E)
    offsets_E1 = torch.cat([counts_E.new_zeros(1), counts_E.cumsum(0)])
    unsort_idx = torch.empty_like(sort_idx)
    unsort_idx[sort_idx] = torch.arange(N * top_k, device=flat.device)
    return Routing(weights_N_K, experts_N_K, probs_N_E, counts_E, offsets_E1, sort_idx, unsort_idx,
                   sort_idx // top_k)


# ---------------------------------------------------------------------------------------------
# Kernel 1: softmax -> top-k -> renormalize -> per-block expert histogram.

@triton.jit
def _topk_kernel(logits_ptr, probs_ptr, weights_ptr, experts_ptr, block_counts_ptr, N,
                 stride_ln, E: tl.constexpr, TOP_K: tl.constexpr, NORM: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)  # all experts of a token in one tile: E <= a few hundred
    row_ok = rows < N
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    # Padding rows read 0 (harmless finite values), padding experts -inf (probability exactly 0).
    x = tl.load(logits_ptr + rows[:, None] * stride_ln + cols[None, :], mask=mask, other=0.0)
    x = tl.where(col_ok[None, :], x.to(tl.float32), float("-inf"))
    x = x - tl.max(x, axis=1)[:, None]  # the usual max-shift: exp never overflows
    ex = tl.exp(x)
    p = ex / tl.sum(ex, axis=1)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=mask)

    # Top-k by K rounds of "take the row max, then knock it out". Probabilities are >= 0, so
    # padding experts start at -1 and a taken expert is set to -2. Ties go to the lowest id. A NaN
    # row (the model diverged) is all ties at 0: it takes experts 0..K-1 and weights 0 (NaN once
    # renormalized), so the NaN shows in the loss and no expert id is ever out of range (a NaN
    # equals no maximum, and the id would be BLOCK_E: the permutation would write out of bounds).
    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    top_e = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    work = tl.where(col_ok[None, :], tl.where(p == p, p, 0.0), -1.0)
    for k in tl.static_range(TOP_K):
        best = tl.max(work, axis=1)
        best_e = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)
        top_w = tl.where(kcols[None, :] == k, best[:, None], top_w)
        top_e = tl.where(kcols[None, :] == k, best_e[:, None], top_e)
        work = tl.where(cols[None, :] == best_e[:, None], -2.0, work)
    if NORM:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    kmask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    out = rows[:, None] * TOP_K + kcols[None, :]
    tl.store(weights_ptr + out, top_w, mask=kmask)
    tl.store(experts_ptr + out, top_e.to(tl.int64), mask=kmask)

    # How many of this block's copies went to each expert (-2 marks the chosen ones).
    chosen = (work == -2.0) & row_ok[:, None]
    tl.store(block_counts_ptr + pid * E + cols, tl.sum(chosen.to(tl.int32), axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Kernel 2: per-block histograms [nblocks, E] -> counts, offsets, and each block's start per expert.
# One small launch: in torch, the cumsum down the [nblocks, E] columns alone took 77% of the routing
# time on the H100 (bench/RESULTS.md).

@triton.jit
def _offsets_kernel(block_counts_ptr, counts_ptr, offsets_ptr, base_ptr, nblocks,
                    E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, nblocks, BLOCK_B):  # pass 1: copies per expert
        rows = b0 + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < nblocks) & col_ok[None, :]
        c = tl.load(block_counts_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0)
        total += tl.sum(c, axis=0)
    start = tl.cumsum(total, axis=0) - total  # exclusive: where expert e's segment begins
    tl.store(counts_ptr + cols, total.to(tl.int64), mask=col_ok)
    tl.store(offsets_ptr + cols, start.to(tl.int64), mask=col_ok)
    tl.store(offsets_ptr + E, tl.sum(total, axis=0).to(tl.int64))
    for b0 in range(0, nblocks, BLOCK_B):  # pass 2: block b's copies of e follow those of blocks < b
        rows = b0 + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < nblocks) & col_ok[None, :]
        c = tl.load(block_counts_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0)
        first = start[None, :] + tl.cumsum(c, axis=0) - c  # exclusive cumsum down the blocks
        tl.store(base_ptr + rows[:, None] * E + cols[None, :], first, mask=mask)
        start += tl.sum(c, axis=0)


# ---------------------------------------------------------------------------------------------
# Kernel 3: each block scatters its copies to their expert-sorted positions.

@triton.jit
def _permute_kernel(experts_ptr, base_ptr, sort_ptr, unsort_ptr, token_ptr, NK, E: tl.constexpr,
                    TOP_K: tl.constexpr, COPIES: tl.constexpr, BLOCK_J: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK_J)  # BLOCK_J = COPIES (= BLOCK_N * K) rounded up to a power of 2
    j = pid * COPIES + local       # flat copy index
    ok = (local < COPIES) & (j < NK)
    e = tl.load(experts_ptr + j, mask=ok, other=BLOCK_E).to(tl.int32)  # padding matches no expert
    onehot = (e[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)  # [BLOCK_J, BLOCK_E]
    # Inclusive running count down the copies, read at each copy's own expert: its 1-based rank
    # among this block's copies of that expert, in flat-index order (which makes the sort stable).
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    pos = tl.load(base_ptr + pid * E + e, mask=ok, other=0) + rank
    tl.store(sort_ptr + pos, j.to(tl.int64), mask=ok)
    tl.store(unsort_ptr + j, pos.to(tl.int64), mask=ok)
    tl.store(token_ptr + pos, (j // TOP_K).to(tl.int64), mask=ok)


def _route_kernels(logits_N_E: Tensor, top_k: int, norm: bool):
    N, E = logits_N_E.shape
    dev = logits_N_E.device
    if logits_N_E.stride(1) != 1:
        logits_N_E = logits_N_E.contiguous()
    BLOCK_N = 16  # tokens per program: a [16, E] softmax tile and a [16*K, E] one-hot tile
    nblocks = triton.cdiv(N, BLOCK_N)
    BLOCK_E, BLOCK_K = triton.next_power_of_2(E), triton.next_power_of_2(top_k)
    probs = torch.empty(N, E, device=dev, dtype=torch.float32)
    weights = torch.empty(N, top_k, device=dev, dtype=torch.float32)
    experts = torch.empty(N, top_k, device=dev, dtype=torch.int64)
    block_counts = torch.empty(nblocks, E, device=dev, dtype=torch.int32)
    _topk_kernel[(nblocks,)](logits_N_E, probs, weights, experts, block_counts, N,
                             logits_N_E.stride(0), E=E, TOP_K=top_k, NORM=norm,
                             BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K)
    counts = torch.empty(E, device=dev, dtype=torch.int64)
    offsets = torch.empty(E + 1, device=dev, dtype=torch.int64)
    base = torch.empty_like(block_counts)
    _offsets_kernel[(1,)](block_counts, counts, offsets, base, nblocks, E=E,
                          BLOCK_B=max(1, 4096 // BLOCK_E), BLOCK_E=BLOCK_E, num_warps=8)
    sort_idx = torch.empty(N * top_k, device=dev, dtype=torch.int64)
    unsort_idx, token = torch.empty_like(sort_idx), torch.empty_like(sort_idx)
    _permute_kernel[(nblocks,)](experts, base, sort_idx, unsort_idx, token, N * top_k,
                                E=E, TOP_K=top_k, COPIES=BLOCK_N * top_k,
                                BLOCK_J=triton.next_power_of_2(BLOCK_N * top_k), BLOCK_E=BLOCK_E)
    return probs, weights, experts, counts, offsets, sort_idx, unsort_idx, token


class _Route(torch.autograd.Function):
    """Forward: the three kernels. Backward: the analytic gradient of probs and weights w.r.t. the
    logits, so no softmax is recomputed. With q = probs[experts] and S = sum_k q_k:
        weights = q / S  =>  dq = (dweights - sum_k dweights_k * weights_k) / S   (plain: dq = dw)
        probs = softmax(logits)  =>  dlogits = p * (dp - sum_e dp_e * p_e)
    where dp collects the probs gradient (aux loss) plus dq scattered to the chosen experts."""

    @staticmethod
    def forward(ctx, logits_N_E, top_k, norm):
        probs, weights, experts, *perm = _route_kernels(logits_N_E, top_k, norm)
        ctx.save_for_backward(probs, weights, experts)
        ctx.norm, ctx.dtype = norm, logits_N_E.dtype
        ctx.mark_non_differentiable(experts, *perm)
        return probs, weights, experts, *perm

    @staticmethod
    def backward(ctx, dprobs, dweights, *_):
        probs, weights, experts = ctx.saved_tensors
        dprobs = torch.zeros_like(probs) if dprobs is None else dprobs.float()
        if dweights is not None:
            dq = dweights.float()
            if ctx.norm:
                S = probs.gather(1, experts).sum(-1, keepdim=True)
                dq = (dq - (dq * weights).sum(-1, keepdim=True)) / S
            dprobs = dprobs.scatter_add(1, experts, dq)
        dlogits = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
        return dlogits.to(ctx.dtype), None, None


def route_triton(router_logits_N_E: Tensor, top_k: int, norm_topk_prob: bool) -> Routing:
    probs, weights, experts, *perm = _Route.apply(router_logits_N_E, top_k, norm_topk_prob)
    return Routing(weights, experts, probs, *perm)


# ---------------------------------------------------------------------------------------------
# The way back: expert-sorted rows -> token order, weighted by the routing weights.
#     out[t] = sum_k weights[t, k] * y[unsort_idx[t * K + k]]
# A gather and a sum, not an index_add (so it is deterministic on the GPU). In torch that is four
# kernels (gather, cast, multiply, sum); the Triton forward is one, accumulating in fp32.

def combine_reference(y_M_H: Tensor, weights_N_K: Tensor, unsort_idx: Tensor) -> Tensor:
    N, K = weights_N_K.shape
    y_N_K_H = y_M_H[unsort_idx].view(N, K, -1)
    return (y_N_K_H * weights_N_K.to(y_N_K_H.dtype)[..., None]).sum(dim=1)


@triton.jit
def _combine_kernel(y_ptr, unsort_ptr, weights_ptr, out_ptr, H,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)   # one token, BLOCK_H of its H columns
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = tl.load(unsort_ptr + t * TOP_K + k)
        w = tl.load(weights_ptr + t * TOP_K + k).to(tl.float32)
        acc += w * tl.load(y_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


class _Combine(torch.autograd.Function):
    """Forward: the kernel. Backward, in torch: each copy's gradient is its weight times the token's
    (a scatter through the permutation, one row each), each weight's the dot of its copy with it."""

    @staticmethod
    def forward(ctx, y_M_H, weights_N_K, unsort_idx):
        N, K = weights_N_K.shape
        H = y_M_H.shape[1]
        y = y_M_H.contiguous()
        out = torch.empty(N, H, device=y.device, dtype=y.dtype)
        BLOCK_H = min(triton.next_power_of_2(H), 1024)
        if N:
            _combine_kernel[(N, triton.cdiv(H, BLOCK_H))](y, unsort_idx, weights_N_K.contiguous(), out, H,
                                                         TOP_K=K, BLOCK_H=BLOCK_H)
        ctx.save_for_backward(y, weights_N_K, unsort_idx)
        return out

    @staticmethod
    def backward(ctx, dout_N_H):
        y_M_H, weights_N_K, unsort_idx = ctx.saved_tensors
        N, K = weights_N_K.shape
        dout = dout_N_H.float()[:, None, :]                                      # [N, 1, H]
        dweights = (y_M_H[unsort_idx].view(N, K, -1).float() * dout).sum(-1)    # [N, K]
        dy = torch.empty_like(y_M_H)
        dy[unsort_idx] = (weights_N_K.float()[..., None] * dout).view(N * K, -1).to(dy.dtype)
        return dy, dweights.to(weights_N_K.dtype), None


def combine_triton(y_M_H: Tensor, weights_N_K: Tensor, unsort_idx: Tensor) -> Tensor:
    return _Combine.apply(y_M_H, weights_N_K, unsort_idx)
