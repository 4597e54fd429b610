"""Paged decode attention: one new token per sequence, whose k/v are appended to that sequence's
cache and whose query attends over all of it. The cache lives scattered over fixed-size blocks of
a shared pool (see rollout.py for the block tables, model_runner.py for the pool).

    out_S_Hq_D = kernels.paged_decode_attention(q_S_Hq_D, k_S_Hkv_D, v_S_Hkv_D, k_cache, v_cache,
                                                block_tables_S_M, positions_S)

    q, k, v:          the new tokens' query, key and value heads
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], one layer's slice of the pool
    block_tables_S_M: int32/int64, row s lists the blocks of sequence s in order (padding: any valid
                      block id: the torch path gathers every entry)
    positions_S:      int64, the new token's position p: it sees tokens 0..p, itself included

Token t of sequence s sits in block block_tables[s, t // block_size] at row t % block_size, so the
new token's k/v go to that slot for t = p. Query head h attends with kv head h // (Hq // Hkv)
(grouped-query attention). The new token is the last one in its context, so no causal mask is
needed.

Two implementations with the same contract:
- `paged_decode_attention_torch`: writes the new k/v into the pool (index_copy_), gathers every
  sequence's blocks into a padded [S, M*block_size] tensor and runs SDPA with a length mask. Plain
  and obviously right; it reads (and pads to) the longest sequence, so it is the reference and the
  CPU path.
- `paged_decode_attention_triton`: one program per (sequence, kv head). The program loads the
  Hq/Hkv query heads that share this kv head as one [G, D] tile (so each K/V block is read once for
  the whole group, which is the point of GQA at decode time), then walks the sequence's context
  BLOCK_T tokens (a few blocks, each looked up in the block table) at a time with an online softmax
  (running max m, running sum l, rescaled accumulator), as in FlashAttention. The new token is not
  read back: the program stores its k/v to their slot and folds them in from registers last (the
  two cache writes of a step cost no kernels of their own). It reads exactly the cached tokens and
  nothing else, which is what a memory-bound decode step wants, and its two dots run on the tensor
  cores in the pool's dtype with fp32 accumulation (fp32 pools: tf32 where torch allows it), so
  the math stays small next to those reads.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.grouped_gemm import _interpreting, _precision


def paged_decode_attention_torch(q_S_Hq_D: Tensor, k_S_Hkv_D: Tensor, v_S_Hkv_D: Tensor,
                                 k_cache: Tensor, v_cache: Tensor, block_tables_S_M: Tensor,
                                 positions_S: Tensor, scale: float | None = None) -> Tensor:
    S, M = block_tables_S_M.shape
    _, block_size, Hkv, D = k_cache.shape
    block_S = block_tables_S_M.gather(1, (positions_S // block_size)[:, None])[:, 0].long()
    slots_S = block_S * block_size + positions_S % block_size
    k_cache.flatten(0, 1).index_copy_(0, slots_S, k_S_Hkv_D.to(k_cache.dtype))
    v_cache.flatten(0, 1).index_copy_(0, slots_S, v_S_Hkv_D.to(v_cache.dtype))
    # [S, M, block_size, Hkv, D] -> [S, Hkv, M*block_size, D]: each sequence's tokens in order.
    k_S_Hkv_C_D = k_cache[block_tables_S_M.long()].reshape(S, M * block_size, Hkv, D).transpose(1, 2)
    v_S_Hkv_C_D = v_cache[block_tables_S_M.long()].reshape(S, M * block_size, Hkv, D).transpose(1, 2)
    valid_S_C = torch.arange(M * block_size, device=q_S_Hq_D.device) <= positions_S[:, None]
    out = F.scaled_dot_product_attention(q_S_Hq_D[:, :, None, :], k_S_Hkv_C_D, v_S_Hkv_C_D,
                                         attn_mask=valid_S_C[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0, :]


@triton.jit
def _paged_decode_kernel(q_ptr, k_new_ptr, v_new_ptr, k_ptr, v_ptr, tables_ptr, pos_ptr, out_ptr,
                         stride_kn, stride_vn, table_stride, scale,
                         G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                         BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_T: tl.constexpr, PRECISION: tl.constexpr, FP32_MATH: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_T)   # a chunk of BLOCK_T context tokens: BLOCK_T // BS blocks
    g_ok = g < G
    d_ok = d < D
    # q is [S, Hq, D] contiguous; the query heads of kv head h are h*G .. h*G+G-1. The two dots run
    # on the tensor cores in the pool's dtype (bf16: as SDPA would round q), accumulating in fp32;
    # under the interpreter, whose bf16 arithmetic is wrong, everything is fp32 (FP32_MATH).
    dt = tl.float32 if FP32_MATH else k_ptr.dtype.element_ty
    q_rows = s * HKV * G + h * G + g
    q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0).to(dt)
    # The new token: its k/v go to their slot (the pool is [num_blocks, BS, HKV, D] contiguous,
    # so slot * HKV + h is its row for this kv head), rounded to the pool's dtype as every later
    # step will read them, and are folded in after the cached tokens.
    cached = tl.load(pos_ptr + s)   # the new token's position = the tokens before it
    own_block = tl.load(tables_ptr + s * table_stride + cached // BS).to(tl.int64)
    slot_row = (own_block * BS + cached % BS) * HKV + h
    k_new = tl.load(k_new_ptr + s * stride_kn + h * D + d, mask=d_ok, other=0.0).to(k_ptr.dtype.element_ty)
    v_new = tl.load(v_new_ptr + s * stride_vn + h * D + d, mask=d_ok, other=0.0).to(v_ptr.dtype.element_ty)
    tl.store(k_ptr + slot_row * D + d, k_new, mask=d_ok)
    tl.store(v_ptr + slot_row * D + d, v_new, mask=d_ok)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)   # running max of the scores
    l = tl.zeros([BLOCK_G], tl.float32)                 # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)      # running sum of exp(score - m) * v
    # Several blocks per step, so that each step has many loads in flight (one 16-token block per
    # step left the H100 waiting on memory latency: 70 us per call for a 3 us read). A `for` loop,
    # which the GPU compiler software-pipelines: the next chunk's loads overlap this chunk's math.
    for c0 in range(0, cached, BLOCK_T):
        tok = c0 + j
        ok = tok < cached
        # token t lives in block tables[s, t // BS] at row t % BS
        block = tl.load(tables_ptr + s * table_stride + tok // BS, mask=ok, other=0).to(tl.int64)
        kv_off = ((block * BS + tok % BS) * HKV + h)[:, None] * D + d[None, :]
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0).to(dt)
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0).to(dt)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale   # [BLOCK_G, BLOCK_T], fp32
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))   # finite: the first chunk holds a valid token
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        # (p rounded to the pool's dtype for the second dot, as FlashAttention does)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PRECISION)
        m = m_new
    score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale   # the new token, last
    m_new = tl.maximum(m, score)
    alpha = tl.exp(m - m_new)   # 0 when nothing was cached (m = -inf)
    p = tl.exp(score - m_new)
    out = (acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]) / (l * alpha + p)[:, None]
    tl.store(out_ptr + q_rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def kernel_fits(block_size: int) -> bool:
    """The block sizes the kernel takes: powers of two >= 16. It walks BLOCK_T = max(64, block_size)
    tokens a step (a power of two: tl.arange) and finds each token's block by division, so others
    would work too (under the interpreter it matches the torch path for block sizes 4 to 48). The
    rule is conservative: the sizes the kernel was written for (the GPU tests run 16)."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def paged_decode_attention_triton(q_S_Hq_D: Tensor, k_S_Hkv_D: Tensor, v_S_Hkv_D: Tensor,
                                  k_cache: Tensor, v_cache: Tensor, block_tables_S_M: Tensor,
                                  positions_S: Tensor, scale: float | None = None) -> Tensor:
    S, Hq, D = q_S_Hq_D.shape
    _, block_size, Hkv, _ = k_cache.shape
    assert kernel_fits(block_size), \
        f"paged_attention.py: the Triton kernel needs a power-of-two block_size >= 16, got {block_size}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and Hq % Hkv == 0
    q = q_S_Hq_D.contiguous()
    # the new k/v: each token's heads contiguous, tokens at any stride (v is a view of the fused
    # qkv projection's output)
    k, v = (t if t.stride(2) == 1 and t.stride(1) == D else t.contiguous() for t in (k_S_Hkv_D, v_S_Hkv_D))
    out = torch.empty_like(q)
    G = Hq // Hkv
    _paged_decode_kernel[(S, Hkv)](
        q, k, v, k_cache, v_cache, block_tables_S_M, positions_S, out, k.stride(0), v.stride(0),
        block_tables_S_M.stride(0), D ** -0.5 if scale is None else scale, G=G, HKV=Hkv, D=D,
        BS=block_size, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=max(64, block_size),
        PRECISION=_precision(k_cache), FP32_MATH=_interpreting())
    return out
