"""Triton kernels against their references: fused routing and the grouped GEMM (forward, dX, dW).

On a CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 and,
for this file, NANOCASCADE_TRITON=1), so the shapes are small and the products are fp32 with
`input_precision="ieee"`, checked against float64. Group sizes include empty experts, one-row
experts and ragged sizes that are not multiples of the (16-wide) interpreter tiles. GPU tests at
the end check the bf16 path at a realistic size.
"""
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
import triton

import kernels
from kernels.grouped_gemm import grouped_mm_reference, grouped_mm_triton, grouped_swiglu_triton
from kernels.qk_norm_rope import qk_norm_rope_triton
from kernels.routing import combine_reference, combine_triton, route_reference, route_triton
from kernels.sampling import draw_reference, draw_triton

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The exact-math tests below run on the GPU when there is one (compiled kernels, fp32 "ieee" dots),
# else on the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Routing

@pytest.mark.parametrize("N,E,K,norm", [(37, 8, 2, True), (50, 12, 3, False), (20, 128, 8, True),
                                        (5, 6, 1, False),
                                        (700, 128, 2, True)])  # 44 blocks: _offsets_kernel loops twice
def test_route_matches_reference(N, E, K, norm):
    torch.manual_seed(N * E + K)
    logits = (torch.randn(N, E) * 3).to(DEVICE)
    r = route_triton(logits, K, norm)

    probs64 = torch.softmax(logits.double(), -1)
    top64, experts64 = torch.topk(probs64, K, dim=-1)
    if norm:
        top64 = top64 / top64.sum(-1, keepdim=True)
    torch.testing.assert_close(r.probs_N_E.double(), probs64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.weights_N_K.double(), top64, rtol=1e-5, atol=1e-7)
    assert torch.equal(r.experts_N_K, experts64)

    ref = route_reference(logits, K, norm)
    for name in ["experts_N_K", "counts_E", "offsets_E1", "sort_idx", "unsort_idx", "token_M"]:
        got, want = getattr(r, name), getattr(ref, name)
        assert got.dtype == want.dtype == torch.int64, name
        assert torch.equal(got, want), name
    for name in ["weights_N_K", "probs_N_E"]:
        assert getattr(r, name).dtype == torch.float32, name

    # The permutation itself, checked from its definition rather than against argsort:
    flat = r.experts_N_K.flatten()
    assert torch.equal(r.offsets_E1, torch.cat([torch.zeros(1, dtype=torch.long, device=DEVICE),
                                                torch.bincount(flat, minlength=E).cumsum(0)]))
    for e in range(E):  # expert e's segment holds exactly its copies, in increasing flat index
        seg = r.sort_idx[r.offsets_E1[e]:r.offsets_E1[e + 1]]
        assert (flat[seg] == e).all() and (seg.diff() > 0).all()
    assert torch.equal(r.sort_idx[r.unsort_idx], torch.arange(N * K, device=DEVICE))
    assert torch.equal(r.token_M, r.sort_idx // K)


@pytest.mark.parametrize("norm", [True, False])
def test_route_of_a_nan_row_stays_in_range(norm):
    """A diverged model's NaN router logits still route every copy to a real expert (never to id E,
    which would scatter out of bounds on the GPU), and the NaN is not hidden: its probabilities stay
    NaN for the aux loss, and its weights too once renormalized."""
    N, E, K = 20, 8, 2
    logits = torch.randn(N, E, device=DEVICE)
    logits[3] = float("nan")
    r = route_triton(logits, K, norm)
    assert ((r.experts_N_K >= 0) & (r.experts_N_K < E)).all()
    assert r.offsets_E1[-1] == N * K and torch.equal(r.sort_idx.sort().values, torch.arange(N * K, device=DEVICE))
    assert r.experts_N_K[3].tolist() == [0, 1] and r.probs_N_E[3].isnan().all()
    assert r.weights_N_K[3].isnan().all() if norm else (r.weights_N_K[3] == 0).all()
    ok = torch.arange(N, device=DEVICE) != 3   # the other rows are routed as always
    ref = route_reference(logits[ok], K, norm)
    assert torch.equal(r.experts_N_K[ok], ref.experts_N_K)


@pytest.mark.parametrize("norm", [True, False])
def test_route_gradient_matches_reference(norm):
    """The kernel is forward-only; _Route.backward's analytic gradient must equal autograd's."""
    torch.manual_seed(1 + norm)
    N, E, K = 29, 10, 3
    logits = torch.randn(N, E, dtype=torch.float64)
    dweights, dprobs = torch.randn(N, K, dtype=torch.float64), torch.randn(N, E, dtype=torch.float64)

    def reference(x64):  # float64 softmax -> gather -> renorm, differentiated by autograd
        p64 = torch.softmax(x64, -1)
        w64 = p64.gather(1, torch.topk(p64, K).indices)
        return (w64 / w64.sum(-1, keepdim=True) if norm else w64), p64

    for with_probs in [True, False]:  # the aux loss path adds a probs gradient; the MoE output not
        x = logits.float().requires_grad_()
        r = route_triton(x.to(DEVICE), K, norm)
        loss = (r.weights_N_K.double().cpu() * dweights).sum()
        x64 = logits.clone().requires_grad_()
        w64, p64 = reference(x64)
        loss64 = (w64 * dweights).sum()
        if with_probs:
            loss = loss + (r.probs_N_E.double().cpu() * dprobs).sum()
            loss64 = loss64 + (p64 * dprobs).sum()
        loss.backward()
        loss64.backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
        assert x.grad.abs().max() > 1e-2  # a vanishing gradient would also be "close"


# ---------------------------------------------------------------------------------------------
# Grouped GEMM

# (group sizes, K, N): empty experts first/middle/last, one-row experts, ragged sizes that are not
# multiples of the 16-row tile, K and N not multiples of the tile (and smaller than it).
CASES = [([5, 0, 17, 1, 33], 24, 40), ([0, 1, 1, 0, 16, 2, 0], 40, 8), ([0, 0, 19], 8, 24),
         ([0, 0], 16, 16)]


@pytest.mark.parametrize("counts,K,N", CASES)
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_mm_forward_and_backward(counts, K, N, gather):
    torch.manual_seed(len(counts) * 100 + K + N + gather)
    E, M = len(counts), sum(counts)
    offsets = torch.tensor([0] + counts).cumsum(0)
    T = M // 2 + 1 if gather else M  # gathered: fewer tokens than rows, some rows share a token
    gather_idx = torch.randint(0, T, (M,)) if gather else None
    x64, w64 = torch.randn(T, K, dtype=torch.float64), torch.randn(E, K, N, dtype=torch.float64)
    dy64 = torch.randn(M, N, dtype=torch.float64)

    x, w = x64.float().to(DEVICE).requires_grad_(), w64.float().to(DEVICE).requires_grad_()
    y = grouped_mm_triton(x, w, offsets.to(DEVICE), gather_idx if gather_idx is None else gather_idx.to(DEVICE))
    dx, dw = torch.autograd.grad(y, (x, w), dy64.float().to(DEVICE))
    y, dx, dw = y.cpu(), dx.cpu(), dw.cpu()

    # float64 reference, written out per expert (independent of grouped_mm_reference)
    xs = x64 if gather_idx is None else x64[gather_idx]
    y_ref, dx_ref, dw_ref = torch.zeros(M, N, dtype=torch.float64), torch.zeros_like(x64), torch.zeros_like(w64)
    for e in range(E):
        rows = slice(offsets[e], offsets[e + 1])
        y_ref[rows] = xs[rows] @ w64[e]
        dw_ref[e] = xs[rows].T @ dy64[rows]
    dxs = torch.cat([dy64[offsets[e]:offsets[e + 1]] @ w64[e].T for e in range(E)])
    dx_ref = dxs if gather_idx is None else dx_ref.index_add_(0, gather_idx, dxs)

    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-4)
    for e in range(E):  # empty experts get an exact zero gradient, not leftover memory
        if counts[e] == 0:
            assert (dw[e] == 0).all()

    # The torch reference (the model's CPU path) agrees as well.
    y2 = grouped_mm_reference(x64, w64, offsets, gather_idx)
    torch.testing.assert_close(y2, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_backward_by_copies_equals_atomic_adds(dtype):
    """The MoE's gather (row j reads token sort_idx[j] // K) with copies_N_K = unsort_idx.view(N, K):
    dx sums each token's K copies by a gather. Same dx as index_add_ (and float64), same y and dw."""
    torch.manual_seed(11)
    N, E, K, H, F = 21, 5, 3, 24, 40
    r = route_reference(torch.randn(N, E), K, True)
    gather_idx, copies = (r.sort_idx // K).to(DEVICE), r.unsort_idx.view(N, K).to(DEVICE)
    x64, w64 = torch.randn(N, H, dtype=torch.float64), torch.randn(E, H, F, dtype=torch.float64)
    dy64 = torch.randn(N * K, F, dtype=torch.float64)
    results = []
    for copies_N_K in [copies, None]:
        x, w = x64.to(DEVICE, dtype).requires_grad_(), w64.to(DEVICE, dtype).requires_grad_()
        y = grouped_mm_triton(x, w, r.offsets_E1.to(DEVICE), gather_idx, copies_N_K)
        dx, dw = torch.autograd.grad(y, (x, w), dy64.to(DEVICE, dtype))
        results.append([t.double().cpu() for t in (y, dx, dw)])
    (y, dx, dw), (y_atomic, dx_atomic, dw_atomic) = results
    xr = x64.to(dtype).double().requires_grad_()  # the same rounded inputs, in float64
    y_ref = grouped_mm_reference(xr, w64.to(dtype).double(), r.offsets_E1, r.sort_idx // K)
    dx_ref, = torch.autograd.grad(y_ref, xr, dy64.to(dtype).double())
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(dx, dx_atomic, **tol)
    assert torch.equal(y, y_atomic) and torch.equal(dw, dw_atomic)  # only dx's summation differs
    with pytest.raises(AssertionError, match="copies"):
        grouped_mm_triton(x64.float(), w64.float(), r.offsets_E1, r.sort_idx // K, r.unsort_idx.view(K, N))


def test_grouped_mm_bf16():
    """bf16 inputs (on a CPU the kernels upcast right after loading), fp32 accumulation."""
    torch.manual_seed(3)
    counts, K, N = [3, 0, 20, 1], 24, 40
    offsets = torch.tensor([0] + counts).cumsum(0)
    x64, w64 = torch.randn(13, K, dtype=torch.float64), torch.randn(len(counts), K, N, dtype=torch.float64)
    gather_idx = torch.randint(0, 13, (sum(counts),))
    x, w = x64.bfloat16().requires_grad_(), w64.bfloat16().requires_grad_()
    y = grouped_mm_triton(x.to(DEVICE), w.to(DEVICE), offsets.to(DEVICE), gather_idx.to(DEVICE))
    dy = torch.randn(y.shape).bfloat16()
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(DEVICE))
    y = y.cpu()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = grouped_mm_reference(xr, wr, offsets, gather_idx)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (xr, wr), dy.double())
    for got, want in [(y, y_ref), (dx, dx_ref), (dw, dw_ref)]:
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).norm() / want.norm() < 1e-2  # bf16 rounding of the result


@pytest.mark.parametrize("counts,K,N", CASES[:3])
def test_grouped_swiglu_equals_grouped_mm_then_swiglu(counts, K, N):
    """The epilogue version equals the two-step math in float64: silu(gate) * up of the product,
    gate = the first N columns of W, up = the last N; ragged and empty groups, a gather."""
    torch.manual_seed(sum(counts) + K)
    E, M = len(counts), sum(counts)
    offsets, gather_idx = torch.tensor([0] + counts).cumsum(0), torch.randint(0, M // 2 + 1, (M,))
    x64, w64 = torch.randn(M // 2 + 1, K, dtype=torch.float64), torch.randn(E, K, 2 * N, dtype=torch.float64)
    got = grouped_swiglu_triton(x64.float().to(DEVICE), w64.float().to(DEVICE), offsets.to(DEVICE),
                                gather_idx.to(DEVICE)).cpu()
    h = torch.cat([x64[gather_idx][offsets[e]:offsets[e + 1]] @ w64[e] for e in range(E)])
    want = torch.nn.functional.silu(h[:, :N]) * h[:, N:]
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_moe_decoding_through_the_swiglu_epilogue_equals_the_torch_path():
    """model.MoE's decode path (one grouped_swiglu, the Triton kernel here) gives the output of its
    training path (grouped_mm, then silu * up)."""
    from model import MoE, ModelConfig
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.json")) as f:
        config = ModelConfig.from_dict({**json.load(f), "hidden_size": 32, "moe_intermediate_size": 24,
                                        "num_experts": 6, "num_experts_per_tok": 3})
    torch.manual_seed(6)
    moe = MoE(config).to(DEVICE)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, 9, config.hidden_size, device=DEVICE)
        torch.testing.assert_close(moe(x, decode=True)[0], moe(x)[0], rtol=1e-5, atol=1e-5)


def test_moe_layer_end_to_end():
    """route -> grouped_mm -> combine (all three kernels) equals a per-token loop."""
    torch.manual_seed(7)
    N, E, K, H, F = 23, 6, 2, 24, 20
    logits = torch.randn(N, E)
    x64, w64 = torch.randn(N, H, dtype=torch.float64), torch.randn(E, H, F, dtype=torch.float64)
    r = kernels.route(logits.to(DEVICE), K, True)
    y_sorted = kernels.grouped_mm(x64.float().to(DEVICE), w64.float().to(DEVICE), r.offsets_E1, r.sort_idx // K)
    out = kernels.combine(y_sorted, r.weights_N_K, r.unsort_idx).cpu()

    probs = torch.softmax(logits.double(), -1)
    top, experts = torch.topk(probs, K)
    top = top / top.sum(-1, keepdim=True)
    ref = torch.stack([sum(top[t, k] * x64[t] @ w64[experts[t, k]] for k in range(K))
                       for t in range(N)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("N,K,H", [(19, 2, 24), (7, 4, 1100), (1, 1, 16)])   # H > 1024: two column blocks
def test_combine_matches_reference_forward_and_backward(N, K, H):
    torch.manual_seed(N + K)
    y = torch.randn(N * K, H, dtype=torch.float64)
    weights = torch.rand(N, K, dtype=torch.float64)
    unsort = torch.randperm(N * K)
    dout = torch.randn(N, H, dtype=torch.float64)
    results = []
    for fn, dtype, device in [(combine_triton, torch.float32, DEVICE),
                              (combine_reference, torch.float64, "cpu")]:
        yd, wd = (t.to(device, dtype).requires_grad_() for t in (y, weights))
        out = fn(yd, wd, unsort.to(device))
        grads = torch.autograd.grad(out, [yd, wd], dout.to(device, dtype))
        results.append([t.double().cpu() for t in (out, *grads)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_moe_block_through_the_kernels_equals_the_torch_path(monkeypatch):
    """model.MoE forward and backward through routing + grouped GEMM kernels (fused gather, dx summed
    by copies_N_K) equal its torch path (the references, on the CPU) for every gradient."""
    from model import MoE, ModelConfig
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.json")) as f:
        config = ModelConfig.from_dict({**json.load(f), "hidden_size": 32, "moe_intermediate_size": 24,
                                        "num_experts": 6, "num_experts_per_tok": 3})
    torch.manual_seed(5)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, config.hidden_size)
    dy = torch.randn(2, 9, config.hidden_size)

    def run(module, device):
        xd = x.to(device).requires_grad_()
        out, aux = module(xd)
        grads = torch.autograd.grad((out * dy.to(device)).sum() + aux, [xd, *module.parameters()])
        return [t.detach().cpu() for t in (out, aux, *grads)]
    kernel = run(copy.deepcopy(moe).to(DEVICE), DEVICE)
    monkeypatch.delenv("NANOCASCADE_TRITON")  # restored at teardown, before the autouse fixture's
    reference = run(moe, "cpu")
    assert len(kernel) == len(reference) == 3 + len(list(moe.parameters()))
    for got, want in zip(kernel, reference):  # fp32 on both sides: only the order of sums differs
        assert (got - want).norm() <= 1e-5 * want.norm() and want.norm() > 0


# ---------------------------------------------------------------------------------------------
# QK-norm + RoPE in one kernel (inference)

@pytest.mark.parametrize("B,T,Hq,Hkv,D", [(1, 1, 8, 2, 64), (3, 5, 4, 2, 32), (2, 7, 6, 3, 16),
                                           (2, 3, 4, 4, 48)])   # head_dim 48: half-tiles masked
def test_qk_norm_rope_matches_the_model_path(B, T, Hq, Hkv, D):
    """fp32: the kernel equals model.qk_norm_rope, the torch path (only the order of sums differs),
    at arbitrary positions, with head counts and a head_dim that are not powers of two, q and k
    read through strided views of one projection (as a fused QKV output would give them), and
    [B, H, T, D] views of [B, T, H, D] memory out, as the torch path returns them."""
    from model import qk_norm_rope, rope_cos_sin
    torch.manual_seed(B * T + D)
    qk = torch.randn(B, T, (Hq + Hkv) * D, device=DEVICE) * 3
    q, k = qk[..., :Hq * D].view(B, T, Hq, D), qk[..., Hq * D:].view(B, T, Hkv, D)
    qw, kw = torch.randn(D, device=DEVICE), torch.randn(D, device=DEVICE)
    cos, sin = rope_cos_sin(torch.randint(0, 4000, (B, T), device=DEVICE), D, 1e6, torch.float32)
    got = qk_norm_rope_triton(q, k, qw, kw, cos, sin, 1e-6)
    want = qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_qk_norm_rope_bf16_activations_fp32_angles():
    """Under autocast the projections give bf16 q, k while the weights and angles are fp32: the
    output is fp32, as on the torch path, computed in fp32 from the bf16 inputs (so within fp32
    rounding of an exact float64 evaluation, where the torch path rounds to bf16 after the norm)."""
    from model import qk_norm_rope, rope_cos_sin
    torch.manual_seed(3)
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 32
    q = torch.randn(B, T, Hq, D, device=DEVICE).bfloat16()
    k = torch.randn(B, T, Hkv, D, device=DEVICE).bfloat16()
    qw, kw = torch.randn(D, device=DEVICE), torch.randn(D, device=DEVICE)
    cos, sin = rope_cos_sin(torch.randint(0, 100, (B, T), device=DEVICE), D, 1e4, torch.float32)
    got_q, got_k = qk_norm_rope_triton(q, k, qw, kw, cos, sin, 1e-6)
    exact = qk_norm_rope(*(t.double() for t in (q, k, qw, kw, cos, sin)), 1e-6)
    torch_q, _ = qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    assert got_q.dtype == got_k.dtype == torch_q.dtype == torch.float32
    for g, w in zip((got_q, got_k), exact):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    assert (got_q.double() - exact[0]).abs().max() < (torch_q.double() - exact[0]).abs().max()


def test_the_model_uses_them_only_to_decode_without_grad(monkeypatch):
    """model.py takes its forward-only kernels (QK-norm + RoPE, SwiGLU in the expert GEMM) for a
    forward through an attention hook (a KV cache) with no gradient recorded, and the torch path
    for training and for cache-less forwards (the logprobs that train, or are trained against)."""
    import model
    from model import ModelConfig, Transformer
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.json")) as f:
        config = ModelConfig.from_dict({**json.load(f), "num_hidden_layers": 1})
    net = Transformer(config).to(DEVICE)
    calls = []
    monkeypatch.setattr(model, "qk_norm_rope_triton", lambda *a: calls.append("qk") or qk_norm_rope_triton(*a))
    monkeypatch.setattr(model, "grouped_swiglu", lambda *a: calls.append("swiglu") or kernels.grouped_swiglu(*a))
    # only these kernels through the interpreter: routing and the grouped GEMM on their torch path
    monkeypatch.setattr(model, "use_triton", lambda t: True)
    monkeypatch.delenv("NANOCASCADE_TRITON")
    hook = lambda layer, q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True)
    ids = torch.randint(0, config.vocab_size, (2, 6), device=DEVICE)
    with torch.no_grad():
        plain = net(ids)[0]
        assert not calls
        cached = net(ids, attention=hook)[0]
        assert calls == ["qk", "swiglu"]
    net(ids, attention=hook)[0].sum().backward()   # with grad: the torch path
    assert calls == ["qk", "swiglu"]
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Drawing tokens (the rollout engine's sampler)

@pytest.mark.parametrize("logits,temperature,rows", [
    ([2.0, 1.5, 1.0, float("-inf"), 0.0, -0.5, -1.0, -3.0], 0.5, 40_000),   # one tile; a truncated token
    # 130 columns: three interpreter tiles, with the likely tokens at both ends of the first two
    ({5: 0.0, 63: 0.5, 64: 1.0, 129: -0.5}, 1.0, 2_000)])
def test_draw_samples_the_distribution_whose_logprobs_it_returns(logits, temperature, rows):
    """Counting: each token's frequency is within 5 standard errors of softmax(logits / T), a -inf
    (truncated) token is never drawn, and every logprob is its token's log_softmax. The one-pass
    Gumbel-max argmax and online normalizer must carry across tiles for the second row."""
    if isinstance(logits, dict):
        row = torch.full((130,), float("-inf"))
        row[list(logits)] = torch.tensor(list(logits.values()))
    else:
        row = torch.tensor(logits)
    philox_2 = torch.tensor([7, 0], device=DEVICE)
    tokens, logprobs = draw_triton(row.to(DEVICE).expand(rows, -1), temperature, philox_2)
    assert philox_2.tolist() == [7, 1], "a draw moves the key on by one step"
    tokens = tokens.cpu()
    expected = (row.double() / temperature).softmax(-1)
    torch.testing.assert_close(logprobs.cpu().double(), expected.log()[tokens], atol=1e-5, rtol=0)
    freq = torch.bincount(tokens, minlength=len(row)).double() / rows
    assert (freq[expected == 0] == 0).all()
    stderr = (expected * (1 - expected) / rows).sqrt()
    assert ((freq - expected).abs() <= 5 * stderr + 1e-12).all(), (freq[expected > 0], expected[expected > 0])


def test_draw_keys_greedy_and_wide_rows():
    """Same key, same draws; the next step or another seed, other draws. Over a 3000-token vocabulary
    (several tiles on any device): the logprob is log_softmax's, and temperature 0 is torch's argmax,
    the lowest column among ties (in one tile or in two), with the logprob of the untempered row."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 3000) * 3).to(DEVICE)
    logits[1, [700, 2900]] = logits[2, [10, 11]] = 50.0   # ties across tiles (any device's), within one
    key = lambda seed, step: torch.tensor([seed, step], device=DEVICE)
    a, lp_a = draw_triton(logits, 1.0, key(3, 5))
    b, _ = draw_triton(logits, 1.0, key(3, 5))
    assert torch.equal(a, b)
    assert not torch.equal(a, draw_triton(logits, 1.0, key(3, 6))[0])
    assert not torch.equal(a, draw_triton(logits, 1.0, key(4, 5))[0])
    log_softmax = logits.double().log_softmax(-1)
    torch.testing.assert_close(lp_a.double(), log_softmax.gather(1, a[:, None])[:, 0], atol=1e-5, rtol=0)
    philox_2 = key(3, 5)
    greedy, lp = draw_triton(logits * 2, 0.0, philox_2)
    assert torch.equal(greedy, logits.argmax(-1)) and greedy[1] == 700 and greedy[2] == 10
    assert philox_2.tolist() == [3, 5], "greedy draws no random numbers"
    want, want_lp = draw_reference(logits * 2, 0.0, None)
    assert torch.equal(greedy, want)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)


def test_dispatch(monkeypatch):
    """kernels.route / kernels.grouped_mm take the Triton path under NANOCASCADE_TRITON=1 and the
    torch reference otherwise (CPU tensors)."""
    calls = []
    monkeypatch.setattr(kernels, "grouped_mm_triton", lambda *a: calls.append("triton"))
    monkeypatch.setattr(kernels, "grouped_mm_reference", lambda *a: calls.append("torch"))
    x, w, offsets = torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([0, 1, 4])
    monkeypatch.setenv("NANOCASCADE_TRITON", "1")
    kernels.grouped_mm(x, w, offsets)
    monkeypatch.delenv("NANOCASCADE_TRITON")
    kernels.grouped_mm(x, w, offsets)
    assert calls == ["triton", "torch"]
    monkeypatch.setattr(kernels, "route_triton", lambda *a: "triton")
    monkeypatch.setattr(kernels, "route_reference", lambda *a: "torch")
    assert kernels.route(x, 2, True) == "torch"
    monkeypatch.setenv("NANOCASCADE_TRITON", "1")
    assert kernels.route(x, 2, True) == "triton"
    monkeypatch.setattr(kernels, "combine_triton", lambda *a: "triton")
    monkeypatch.setattr(kernels, "combine_reference", lambda *a: "torch")
    assert kernels.combine(x, x, x) == "triton"
    monkeypatch.delenv("NANOCASCADE_TRITON")
    assert kernels.combine(x, x, x) == "torch"
    # draw: the kernel needs the device key as well
    monkeypatch.setattr(kernels, "draw_triton", lambda *a: "triton")
    monkeypatch.setattr(kernels, "draw_reference", lambda *a: "torch")
    philox_2 = torch.zeros(2, dtype=torch.long)
    assert kernels.draw(x, 1.0, None, philox_2) == "torch"
    monkeypatch.setenv("NANOCASCADE_TRITON", "1")
    assert kernels.draw(x, 1.0, None, philox_2) == "triton"
    assert kernels.draw(x, 1.0, None, None) == "torch"


# ---------------------------------------------------------------------------------------------
# The interpreter runs kernels as numpy and type-checks nothing; the GPU compiler is stricter (e.g.
# a loop-carried variable may not change dtype). Compile each kernel for an H100 (sm_90) without a
# GPU, as a real launch would specialize it, and check the GEMMs get tensor-core wgmma instructions
# and a software-pipelined (cp.async) main loop, which is where their speed comes from; and that no
# kernel spills registers to local memory (ptxas -v: the assembler Triton itself runs, on the PTX it
# wrote). This runs in a subprocess: triton must be imported with the interpreter off to compile.

def _compile_for_h100(kernel, pointers, constexprs, num_warps=4, num_stages=3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr or param.name in constexprs:  # ints equal to 1 are constexpr too
            signature[param.name] = "constexpr"
        else:  # pointers 16-byte aligned and ints divisible by 16, as Triton marks them at launch
            signature[param.name] = pointers.get(param.name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    assert spills and not any(map(int, spills)), f"{fn.__name__} {constexprs}: spills registers\n{log}"
    return compiled


def compile_all_for_h100():
    import kernels.grouped_gemm as gg
    import kernels.routing as rt
    bf16 = {name: "*bf16" for name in ["a_ptr", "b_ptr", "y_ptr", "x_ptr", "dy_ptr", "dw_ptr"]}
    bf16.update(offsets_ptr="*i64", gather_ptr="*i64")
    fixed = dict(N=768, K=2048, GATHER=True, PRECISION="tf32", FP32_MATH=False)
    for kernel, args in [(gg._grouped_mm_kernel, dict(stride_ak=1, stride_bn=1, SWIGLU=False)),
                         (gg._grouped_mm_kernel, dict(stride_ak=1, stride_bn=1, SWIGLU=True)),
                         (gg._grouped_dw_kernel, dict(stride_xk=1))]:
        prune = kernel.early_config_prune or (lambda configs, named_args, **kw: configs)
        for config in prune(kernel.configs, {}, **args):   # every tile autotune may pick
            k = _compile_for_h100(kernel, bf16, dict(**fixed, **args, **config.kwargs),
                                  num_warps=config.num_warps, num_stages=config.num_stages)
            assert "wgmma" in k.asm["ptx"] and "cp.async" in k.asm["ptx"], "GEMM main loop not pipelined"
    _compile_for_h100(rt._topk_kernel, dict(logits_ptr="*fp32", probs_ptr="*fp32", weights_ptr="*fp32",
                                            experts_ptr="*i64", block_counts_ptr="*i32"),
                      dict(E=128, TOP_K=8, NORM=True, BLOCK_N=16, BLOCK_E=128, BLOCK_K=8))
    import kernels.paged_attention as pa
    paged = _compile_for_h100(pa._paged_decode_kernel, dict(q_ptr="*bf16", k_new_ptr="*bf16",
                                                            v_new_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16",
                                                            tables_ptr="*i32", pos_ptr="*i64", out_ptr="*bf16",
                                                            scale="fp32"),
                              dict(G=4, HKV=2, D=64, BS=16, BLOCK_G=16, BLOCK_D=64, BLOCK_T=64,
                                   PRECISION="tf32", FP32_MATH=False))
    assert "mma" in paged.asm["ptx"], "paged attention's dots not on the tensor cores"
    assert "cp.async" in paged.asm["ptx"], "paged attention's K/V loads not pipelined"
    _compile_for_h100(rt._combine_kernel, dict(y_ptr="*bf16", unsort_ptr="*i64", weights_ptr="*fp32",
                                               out_ptr="*bf16"), dict(TOP_K=8, BLOCK_H=512))
    import kernels.qk_norm_rope as qr
    _compile_for_h100(qr._qk_norm_rope_kernel,
                      dict(q_ptr="*bf16", k_ptr="*bf16", qw_ptr="*bf16", kw_ptr="*bf16", cos_ptr="*bf16",
                           sin_ptr="*bf16", q_out_ptr="*bf16", k_out_ptr="*bf16", eps="fp32"),
                      dict(HQ=8, HKV=2, D=64, HALF=32, BLOCK_H=8, BLOCK_I=32))
    import kernels.sampling as sm
    for greedy in (False, True):
        _compile_for_h100(sm._draw_kernel, dict(logits_ptr="*bf16", scale="fp32", philox_ptr="*i64",
                                                tokens_ptr="*i64", logprobs_ptr="*fp32"),
                          dict(V=8192, GREEDY=greedy, BLOCK_R=1, BLOCK_V=2048))
    _compile_for_h100(rt._offsets_kernel, dict(block_counts_ptr="*i32", counts_ptr="*i64", offsets_ptr="*i64",
                                               base_ptr="*i32"), dict(E=128, BLOCK_B=32, BLOCK_E=128))
    _compile_for_h100(rt._permute_kernel, dict(experts_ptr="*i64", base_ptr="*i32", sort_ptr="*i64",
                                               unsort_ptr="*i64", token_ptr="*i64"),
                      dict(E=128, TOP_K=8, COPIES=128, BLOCK_J=128, BLOCK_E=128))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run them for real")
def test_kernels_compile_for_h100():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys; sys.path[:0] = ['.', 'tests']; import test_kernels; test_kernels.compile_all_for_h100()"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at a realistic size (a few ms each)

@cuda
def test_gpu_route():
    torch.manual_seed(0)
    N, E, K = 4096, 64, 8
    logits = torch.randn(N, E, device="cuda")
    r = route_triton(logits, K, True)
    # Ties between nearly equal probabilities may break differently from torch.topk at the last
    # ulp, so check the selection against the kernel's own probs, and the rest from its experts.
    torch.testing.assert_close(r.probs_N_E, torch.softmax(logits, -1), rtol=1e-5, atol=1e-7)
    top = torch.topk(r.probs_N_E, K).values
    torch.testing.assert_close(r.probs_N_E.gather(1, r.experts_N_K), top, rtol=0, atol=0)
    torch.testing.assert_close(r.weights_N_K, top / top.sum(-1, keepdim=True))
    flat = r.experts_N_K.flatten()
    assert torch.equal(r.sort_idx, torch.argsort(flat, stable=True))
    assert torch.equal(r.counts_E, torch.bincount(flat, minlength=E))
    assert torch.equal(r.sort_idx[r.unsort_idx], torch.arange(N * K, device="cuda"))


@cuda
@pytest.mark.parametrize("gather", [False, True])
def test_gpu_grouped_mm_bf16(gather):
    torch.manual_seed(0)
    N, E, K, H, F = 2048, 16, 4, 512, 384
    logits = torch.randn(N, E, device="cuda")
    logits[:, 2:4] = -1e4  # experts 2 and 3 get no tokens: empty groups
    offsets = route_triton(logits, K, True).offsets_E1
    assert offsets[2] == offsets[4]
    M = N * K
    x = torch.randn(N if gather else M, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(E, H, F, device="cuda") / H**0.5).to(torch.bfloat16).requires_grad_()
    gather_idx = torch.randint(0, N, (M,), device="cuda") if gather else None
    dy = torch.randn(M, F, device="cuda", dtype=torch.bfloat16)
    y = grouped_mm_triton(x, w, offsets, gather_idx)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y_ref = grouped_mm_reference(x32, w32, offsets, gather_idx)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x32, w32), dy.float())
    for got, want in [(y, y_ref), (dx, dx_ref), (dw, dw_ref)]:
        assert got.dtype == torch.bfloat16
        err = (got.float() - want).norm() / want.norm()
        assert err < 1e-2, err  # bf16 inputs/outputs, fp32 accumulation: ~3e-3 expected


@cuda
def test_gpu_grouped_swiglu_bf16():
    torch.manual_seed(1)
    N, E, K, H, I = 2048, 16, 4, 512, 384
    r = route_triton(torch.randn(N, E, device="cuda"), K, True)
    x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(E, H, 2 * I, device="cuda") / H**0.5).to(torch.bfloat16)
    got = grouped_swiglu_triton(x, w, r.offsets_E1, r.token_M)
    h = grouped_mm_reference(x.float(), w.float(), r.offsets_E1, r.token_M)
    want = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    assert got.dtype == torch.bfloat16 and got.shape == (N * K, I)
    err = (got.float() - want).norm() / want.norm()
    assert err < 1e-2, err
