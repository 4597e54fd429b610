"""Randomized-shape ("fuzz") tests of the Triton kernels against their torch references.

tests/test_kernels.py and test_rollout.py check each kernel at hand-picked shapes; here a seeded
random.Random draws them, biased to the edges where tiled code goes wrong: a context of one block or one
kernel chunk (and a token more or less), sizes that are no multiple of a tile, 0 or 1 tokens, empty
experts, ties, -inf logits, strided inputs, fp32 and bf16, but only what model.py, model_runner.py and
rollout.py can pass. Each result is compared with float64 math on the same (rounded) inputs. Under the
interpreter (a CPU) kernels are slow: sizes are small. A failure prints the seed and the drawn case.
"""
import random

import pytest
import torch

from kernels.grouped_gemm import grouped_mm_reference, grouped_mm_triton, grouped_swiglu_reference
from kernels.grouped_gemm import grouped_swiglu_triton
from kernels.paged_attention import paged_decode_attention_torch, paged_decode_attention_triton
from kernels.qk_norm_rope import qk_norm_rope_triton
from kernels.routing import combine_reference, combine_triton, route_reference, route_triton
from kernels.sampling import draw_reference, draw_triton
from model import qk_norm_rope, rope_cos_sin
from test_kernels import DEVICE

pytestmark = pytest.mark.triton
f32, bf16 = torch.float32, torch.bfloat16
# tolerances of fp32 and bf16 results (the interpreter rounds fp32 to bf16 toward zero: up to an ulp)
EXACT, BF16 = dict(rtol=1e-5, atol=1e-5), dict(rtol=2e-2, atol=2e-2)


def close(got, want, case, **tol):   # assert_close in float64, with the drawn case in the message
    torch.testing.assert_close(got.cpu().double(), want.cpu().double(), **tol, msg=lambda m: f"{case}\n{m}")


@pytest.mark.parametrize("seed", range(16))
def test_paged_decode_attention(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    bs = rng.choice([16, 16, 32, 64, 128])   # kernel_fits' block sizes (the engine's default: 16)
    chunk = max(64, bs)                      # BLOCK_T: the tokens the kernel reads per loop step
    Hkv, G, D = rng.choice([1, 2, 4]), rng.choice([1, 2, 4, 8]), rng.choice([16, 32, 64])
    S = rng.randint(1, 9 if Hkv == 1 else 4)
    # the new token at position p: the kernel reads the p cached tokens chunk by chunk, then its own k/v
    edges = [0, 1, bs - 1, bs, bs + 1, chunk - 1, chunk, chunk + 1, 2 * chunk]
    positions = [rng.choice(edges) if rng.random() < 0.75 else rng.randint(0, 2 * chunk) for _ in range(S)]
    # pool, q, k, v: a fp32 model (under autocast v comes in bf16, q and k in fp32), a bf16 model
    dtypes = rng.choice([(f32, f32, f32, f32), (f32, f32, f32, bf16), (bf16,) * 4])
    need = [p // bs + 1 for p in positions]
    M, num_blocks = max(need) + rng.randint(0, 2), sum(need) + rng.randint(1, 5)
    tables = torch.randint(0, num_blocks, (S, M), generator=g)   # padding: any valid block id
    ids = torch.randperm(num_blocks, generator=g)                 # scattered blocks, none shared...
    for s in range(S):
        tables[s, :need[s]], ids = ids[:need[s]], ids[need[s]:]
    if S > 1 and rng.random() < 0.5:   # ...but a prompt's full blocks, which two samples both read
        shared = min(positions[0], positions[1]) // bs
        tables[1, :shared] = tables[0, :shared]
    tables, positions = tables.to(rng.choice([torch.int32, torch.int64])), torch.tensor(positions)
    k_cache, v_cache = (torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtypes[0]) for _ in range(2))
    q = torch.randn(S, G * Hkv, D, generator=g).to(dtypes[1])
    k_new, _, v_new = torch.randn(S, 3, Hkv, D, generator=g).unbind(1)   # strided, as from the qkv GEMM
    k_new, v_new, scale = k_new.to(dtypes[2]), v_new.to(dtypes[3]), rng.choice([None, None, 0.3])
    case = f"seed={seed} S={S} Hq={G * Hkv} Hkv={Hkv} D={D} block_size={bs} positions={positions.tolist()} M={M} " \
           f"num_blocks={num_blocks} dtypes={dtypes} tables={tables.dtype} scale={scale}"
    k64, v64 = k_cache.double(), v_cache.double()   # (the torch path appends the new k/v to these)
    want = paged_decode_attention_torch(q.double(), k_new.to(dtypes[0]).double(), v_new.to(dtypes[0]).double(),
                                        k64, v64, tables, positions, scale)
    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    got = paged_decode_attention_triton(q.to(DEVICE), k_new.to(DEVICE), v_new.to(DEVICE), k_dev, v_dev,
                                        tables.to(DEVICE), positions.to(DEVICE), scale)
    assert got.dtype == q.dtype and got.shape == q.shape, case
    assert torch.equal(k_dev.cpu().double(), k64) and torch.equal(v_dev.cpu().double(), v64), \
        f"{case}: the pool after the kernel's append differs from the torch path's"
    close(got, want, case, **(EXACT if dtypes[0] == f32 else BF16))


@pytest.mark.filterwarnings("ignore:divide by zero")   # (the interpreter, on a tile's padding rows)
@pytest.mark.parametrize("seed", range(16))
def test_draw(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    R = rng.randint(1, 6)
    V = rng.choice([1, 2, 63, 64, 65, 127, 129, 200, rng.randint(1, 300)])   # interpreter tiles: 64
    temperature, dtype = rng.choice([0.0, 0.0, 0.5, 1.0, 1.7]), rng.choice([f32, bf16])
    logits = torch.randn(R, V + 3, generator=g)[:, :V] * rng.choice([1, 4])   # rows at a stride
    for r in range(R):
        if rng.random() < 0.4:   # top-k/top-p truncation: -inf, whole tiles too; one token stays
            drop = torch.rand(V, generator=g) < rng.random()
            drop[rng.randrange(V)] = False
            logits[r, drop] = float("-inf")
        if rng.random() < 0.4:   # a tie for the max, maybe in another tile
            logits[r, rng.randrange(V)] = logits[r].max()
    logits, philox_2 = logits.to(dtype), torch.tensor([rng.randrange(2**31), rng.randrange(2**31)])
    case = f"seed={seed} R={R} V={V} T={temperature} dtype={dtype} key={philox_2.tolist()}"
    key = philox_2.clone().to(DEVICE)
    tokens, logprobs = (t.cpu() for t in draw_triton(logits.to(DEVICE), temperature, key))
    assert tokens.dtype == torch.long and ((tokens >= 0) & (tokens < V)).all(), case
    assert int(key[1]) == int(philox_2[1]) + (temperature > 0), f"{case}: the key moves on iff it drew"
    assert logits.gather(1, tokens[:, None]).isfinite().all(), f"{case}: drew a truncated token"
    if temperature == 0:   # torch's argmax (the lowest index of ties), with the untempered logprob
        assert torch.equal(tokens, draw_reference(logits, 0.0, None)[0]), case
    want = (logits.double() / (temperature or 1.0)).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    close(logprobs, want, case, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("seed", range(12))
def test_qk_norm_rope(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    B, T, Hkv = rng.randint(1, 3), rng.choice([1, 1, rng.randint(2, 6)]), rng.choice([1, 2, 4])
    Hq, D = Hkv * rng.choice([1, 2, 4]), rng.choice([16, 32, 48, 64, 128])
    # q/k and cos/sin: a fp32 model, bf16 activations under autocast (fp32 angles), a bf16 model
    (x_dt, angle_dt), theta = rng.choice([(f32, f32), (bf16, f32), (bf16, bf16)]), rng.choice([1e4, 1e6])
    positions = torch.randint(0, rng.choice([8, 4096, 40960, 10**6]), (B, T), generator=g)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).mul(3).to(x_dt).to(DEVICE)
    q, k = qkv[..., :Hq * D].view(B, T, Hq, D), qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D)
    layout = rng.choice(["qkv views", "contiguous"] + ["sequence_first"])
    if layout != "qkv views":   # a copy the kernel reads as it is, or one it copies
        q = q.contiguous() if layout == "contiguous" else q.transpose(0, 1).contiguous().transpose(0, 1)
    qw, kw = (torch.randn(D, generator=g).to(DEVICE) for _ in range(2))
    cos, sin = rope_cos_sin(positions.to(DEVICE), D, theta, angle_dt)
    case = f"seed={seed} B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} dtypes={x_dt, angle_dt} theta={theta} " \
           f"max position={positions.max().item()} layout={layout}"
    got = qk_norm_rope_triton(q, k, qw, kw, cos, sin, 1e-6)
    model = qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    exact = qk_norm_rope(*(t.double() for t in (q, k, qw, kw, cos, sin)), 1e-6)
    strides = lambda t: [st for st, n in zip(t.stride(), t.shape) if n > 1]  # noqa: E731 (a size-1 dim's: any)
    for got_x, model_x, exact_x in zip(got, model, exact):
        assert (got_x.shape, strides(got_x), got_x.dtype) == (model_x.shape, strides(model_x), model_x.dtype), case
        close(got_x, exact_x, case, **(EXACT if got_x.dtype == f32 else BF16))


def test_qk_norm_rope_of_one_token_per_sequence_in_sequence_first_memory():
    """The fuzz's minimal failure (fixed): q [B=2, T=1, 1, D] in [T, B, H, D] memory is contiguous to
    torch, so the wrapper's .contiguous() kept stride(1) = B*H*D, and sequence 1 read another row.
    (model.py's q is a view of a [B, T, ...] projection, and the engine decodes with B = 1.)"""
    q = torch.randn(2, 2, 1, 2, device=DEVICE)[:1].transpose(0, 1)   # strides (2, 4, 2, 1)
    k, w = torch.randn(2, 1, 1, 2, device=DEVICE), torch.ones(2, device=DEVICE)
    cos, sin = rope_cos_sin(torch.zeros(2, 1, dtype=torch.long, device=DEVICE), 2, 1e4, f32)
    close(qk_norm_rope_triton(q, k, w, w, cos, sin, 1e-6)[0], qk_norm_rope(q, k, w, w, cos, sin, 1e-6)[0],
          "q [2, 1, 1, 2] with strides (2, 4, 2, 1)", **EXACT)


@pytest.mark.parametrize("seed", range(12))
def test_route_and_combine(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    N = rng.choice([0, 1, 15, 16, 17, rng.randint(2, 40)])   # the kernels take 16 tokens a program
    E = rng.choice([1, 2, 3, 8, 12, 64, 100, rng.randint(2, 130)])
    K, norm, dtype = rng.randint(1, min(E, 8)), rng.random() < 0.5, rng.choice([f32, f32, bf16])
    logits = torch.randn(N, E, generator=g) * rng.choice([0.5, 3])
    if rng.random() < 0.3:   # exact ties: the lowest expert id wins
        logits = torch.randint(-2, 2, (N, E), generator=g).float()
    if E - K >= 2 and rng.random() < 0.4:   # experts that no token picks
        logits[:, torch.randperm(E, generator=g)[:rng.randint(1, E - K)]] = -1e4
    logits, H = logits.to(dtype), rng.randint(1, 40)
    case = f"seed={seed} N={N} E={E} K={K} norm={norm} dtype={dtype} H={H}"
    r = route_triton(logits.to(DEVICE), K, norm)
    p64 = logits.double().softmax(-1)
    close(r.probs_N_E, p64, case, rtol=1e-5, atol=1e-7)
    # the top-k of its own probs (float64's might order two nearly equal ones the other way)
    top = r.probs_N_E.cpu().sort(dim=-1, descending=True, stable=True).indices[:, :K]
    assert torch.equal(r.experts_N_K.cpu(), top), case
    w64 = p64.gather(1, top)
    close(r.weights_N_K, w64 / w64.sum(-1, keepdim=True) if norm else w64, case, rtol=1e-5, atol=1e-7)
    # the permutation: route_reference's for the same experts (logits K, K-1, ..., 1 at them, -1 elsewhere)
    picked = torch.full((N, E), -1.0).scatter_(1, top, torch.arange(K, 0, -1.0).expand(N, K))
    ref = route_reference(picked, K, norm)
    for name in ["experts_N_K", "counts_E", "offsets_E1", "sort_idx", "unsort_idx", "token_M"]:
        assert torch.equal(getattr(r, name).cpu(), getattr(ref, name)), f"{case}: {name}"
    y = torch.randn(N * K, H, generator=g).to(dtype)
    out = combine_triton(y.to(DEVICE), r.weights_N_K, r.unsort_idx)
    assert out.shape == (N, H), case   # (combine_reference cannot view 0 rows as [0, K, -1]: no caller has 0)
    if N:
        want = combine_reference(y.double(), r.weights_N_K.cpu().double(), r.unsort_idx.cpu())
        close(out, want, case, **(EXACT if dtype == f32 else BF16))


@pytest.mark.parametrize("seed", range(12))
def test_grouped_gemm(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    E, dtype = rng.randint(1, 6), rng.choice([f32, f32, bf16])
    K, N = (rng.choice([1, 15, 16, 17, 33, rng.randint(1, 40)]) for _ in range(2))   # tiles: 16
    mode, copies, gather = rng.choice(["plain", "gather", "routed"]), None, None
    if mode == "routed":   # the MoE's: each token's top_k copies, sorted by expert (dx summed by copies)
        T, top_k = rng.choice([0, 1, rng.randint(2, 12)]), rng.randint(1, E)
        r = route_reference(torch.randn(T, E, generator=g), top_k, True)
        offsets, gather, copies = r.offsets_E1, r.token_M, r.unsort_idx.view(T, top_k)
    else:   # any group sizes: empty, one row, a tile and one more
        counts = [rng.choice([0, 0, 1, 16, 17, rng.randint(0, 20)]) for _ in range(E)]
        offsets, M = torch.tensor([0] + counts).cumsum(0), sum(counts)
        T = M if mode == "plain" else rng.randint(1, M + 3)
        gather = torch.randint(0, T, (M,), generator=g) if mode == "gather" else None
    case = f"seed={seed} mode={mode} E={E} K={K} N={N} offsets={offsets.tolist()} T={T} dtype={dtype}"
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    x = torch.randn(T, K + 2, generator=g).to(dtype)[:, :K].to(DEVICE).requires_grad_()  # rows at a stride
    w = torch.randn(E, K, N, generator=g).to(dtype).to(DEVICE).requires_grad_()
    y = grouped_mm_triton(x, w, dev(offsets), dev(gather), dev(copies))
    dy = torch.randn(y.shape, generator=g).to(dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(DEVICE))
    x64, w64 = x.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
    y64 = grouped_mm_reference(x64, w64, offsets, gather)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double(), allow_unused=True)   # (unused: no rows)
    results = [(y, y64), (dx, torch.zeros_like(x64) if dx64 is None else dx64), (dw, dw64)]
    if gather is not None:   # decoding's SwiGLU in the epilogue: forward only
        w2 = torch.randn(E, K, 2 * N, generator=g).to(dtype)
        got = grouped_swiglu_triton(x.detach(), w2.to(DEVICE), dev(offsets), dev(gather))
        results.append((got, grouped_swiglu_reference(x64.detach(), w2.double(), offsets, gather)))
    for got, want in results:
        assert got.dtype == dtype and got.shape == want.shape, case
        if dtype == f32:
            close(got, want, case, rtol=1e-5, atol=1e-4)
        else:   # bf16 (a gather without copies sums dx by index_add_ in bf16: no elementwise bound)
            assert (got.cpu().double() - want).norm() <= 1e-2 * want.norm() + 1e-6, case
