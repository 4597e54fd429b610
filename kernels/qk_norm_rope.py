"""Qwen3's QK-norm and RoPE in one kernel, for inference on the GPU (the rollout engine's steps).

    q_B_Hq_T_D, k_B_Hkv_T_D = qk_norm_rope_triton(q_B_T_Hq_D, k_B_T_Hkv_D, q_weight_D, k_weight_D,
                                                  cos_B_1_T_D, sin_B_1_T_D, eps)

computes what model.py's Attention does between its projections and the attention core:

    q = apply_rope(RMSNorm_q(q), cos, sin)        k = apply_rope(RMSNorm_k(k), cos, sin)

(RMSNorm over head_dim of each head, with its own weight; cos and the signed sin of
model.rope_cos_sin; the rotate-half pairs (i, i + D/2)). In torch that is 8 kernels per layer: two
norms, and a roll, a multiply and an addcmul for each of q and k. At decode time every one of them
is a few microseconds of launch for a few kilobytes of work, so here it is one launch: one program
per token, which loads the token's q and k heads as [heads, D/2] halves (x1, x2), normalizes them
in fp32, rotates, and writes q and k in the [B, T, H, D] layout the projections had (returned as the
same [B, H, T, D] views the torch path returns). Everything is computed in fp32 and rounded once,
so in bf16 it can differ from the torch path, which rounds after each op, in the last bit.

Forward only: model.py takes it when decoding (model.decoding) where Triton runs; every other
forward uses the torch path, which is this kernel's reference (tests/test_kernels.py).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _norm_rope_heads(x_ptr, w_ptr, out_ptr, token, stride_t, c, s, eps, H: tl.constexpr,
                     D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    """One token's H heads: RMSNorm over D with weight w, then the rotation by (c, s)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_I)[None, :]    # x1 = dims [0, D/2), x2 = dims [D/2, D)
    ok = (h < H) & (i < HALF)
    x = x_ptr + token.to(tl.int64) * stride_t + h * D + i
    x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)[:, None]   # 1 / rms
    n1 = x1 * r * tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
    n2 = x2 * r * tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    out = out_ptr + token.to(tl.int64) * H * D + h * D + i
    tl.store(out, (n1 * c - n2 * s).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (n2 * c + n1 * s).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                         T, stride_qt, stride_kt, stride_cb, stride_ct, eps,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    token = tl.program_id(0)   # b * T + t
    b = token // T
    t = token % T
    # this token's angles a: cos = (cos a, cos a) and sin = (-sin a, sin a), so the halves
    # c = cos a and s = sin a are all it needs
    i = tl.arange(0, BLOCK_I)[None, :]
    angles = b.to(tl.int64) * stride_cb + t.to(tl.int64) * stride_ct
    c = tl.load(cos_ptr + angles + i, mask=i < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + angles + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    _norm_rope_heads(q_ptr, qw_ptr, q_out_ptr, token, stride_qt, c, s, eps, HQ, D, HALF, BLOCK_H, BLOCK_I)
    _norm_rope_heads(k_ptr, kw_ptr, k_out_ptr, token, stride_kt, c, s, eps, HKV, D, HALF, BLOCK_H, BLOCK_I)


def qk_norm_rope_triton(q_B_T_Hq_D: Tensor, k_B_T_Hkv_D: Tensor, q_weight_D: Tensor,
                        k_weight_D: Tensor, cos_B_1_T_D: Tensor, sin_B_1_T_D: Tensor,
                        eps: float) -> tuple[Tensor, Tensor]:
    B, T, Hq, D = q_B_T_Hq_D.shape
    Hkv = k_B_T_Hkv_D.shape[2]   # (D is even: model.parse_config checks head_dim)
    # each token's heads contiguous, token b * T + t at one stride (the projections' views are). The
    # stride is read off the [B*T] view: with T = 1, dim 1's stride says nothing, even in a tensor
    # torch calls contiguous (which .contiguous() would return as it is)
    q, k = (x.reshape(B * T, x.shape[2], D) for x in (q_B_T_Hq_D, k_B_T_Hkv_D))
    q, k = (x if x.stride(2) == 1 and x.stride(1) == D else x.contiguous() for x in (q, k))
    cos, sin = (x.expand(B, 1, T, D).contiguous() for x in (cos_B_1_T_D, sin_B_1_T_D))
    dtype = torch.promote_types(q.dtype, cos.dtype)   # the torch path's dtype: bf16 q, fp32 cos -> fp32
    q_out = torch.empty(B, T, Hq, D, device=q.device, dtype=dtype)
    k_out = torch.empty(B, T, Hkv, D, device=q.device, dtype=torch.promote_types(k.dtype, cos.dtype))
    _qk_norm_rope_kernel[(B * T,)](q, k, q_weight_D, k_weight_D, cos, sin, q_out, k_out,
                                   T, q.stride(0), k.stride(0), cos.stride(0), cos.stride(2), eps,
                                   HQ=Hq, HKV=Hkv, D=D, HALF=D // 2,
                                   BLOCK_H=triton.next_power_of_2(max(Hq, Hkv)),
                                   BLOCK_I=triton.next_power_of_2(D // 2))
    return q_out.transpose(1, 2), k_out.transpose(1, 2)
