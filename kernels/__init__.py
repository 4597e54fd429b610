"""The one place that chooses between the Triton kernels and their plain-torch references.

    from kernels import route, grouped_mm, grouped_swiglu, combine, draw, paged_decode_attention

Triton runs when the tensors are on a GPU, or when NANOCASCADE_TRITON=1 (the tests set it together
with TRITON_INTERPRET=1 to run the kernels on a CPU through Triton's interpreter). Otherwise the
torch references run: the same math, slower, on any device. Both paths return the same values (in
bf16 up to rounding: the kernels accumulate in fp32), so model code never asks which one it got;
`draw`'s two paths draw from the same distribution with other random numbers (kernels/sampling.py).
The rule is `use_triton`, which model.py asks too, for the forward-only QK-norm + RoPE kernel.
"""
import os

import torch
from torch import Tensor

from kernels.grouped_gemm import (grouped_mm_reference, grouped_mm_triton, grouped_swiglu_reference,
                                  grouped_swiglu_triton)
from kernels.paged_attention import kernel_fits, paged_decode_attention_torch, paged_decode_attention_triton
from kernels.routing import Routing, combine_reference, combine_triton, route_reference, route_triton
from kernels.sampling import draw_reference, draw_triton

__all__ = ["Routing", "route", "grouped_mm", "grouped_swiglu", "combine", "draw", "paged_decode_attention",
           "kernel_fits", "use_triton"]


def use_triton(t: Tensor) -> bool:
    return t.is_cuda or os.environ.get("NANOCASCADE_TRITON") == "1"


def route(router_logits_N_E: Tensor, top_k: int, norm_topk_prob: bool) -> Routing:
    """Softmax -> top-k (-> renormalize) -> expert-sorted permutation. See kernels/routing.py."""
    fn = route_triton if use_triton(router_logits_N_E) else route_reference
    return fn(router_logits_N_E, top_k, norm_topk_prob)


def grouped_mm(x_M_K: Tensor, w_E_K_N: Tensor, offsets_E1: Tensor,
               gather_idx_M: Tensor | None = None, copies_N_K: Tensor | None = None) -> Tensor:
    """Rows offsets[e]:offsets[e+1] of (x or x[gather_idx]) times w[e]. copies_N_K (the rows of each
    token's copies) lets the Triton backward sum them by a gather. See kernels/grouped_gemm.py."""
    if use_triton(x_M_K):
        return grouped_mm_triton(x_M_K, w_E_K_N, offsets_E1, gather_idx_M, copies_N_K)
    return grouped_mm_reference(x_M_K, w_E_K_N, offsets_E1, gather_idx_M)


def grouped_swiglu(x_N_K: Tensor, w_E_K_2I: Tensor, offsets_E1: Tensor, gather_idx_M: Tensor) -> Tensor:
    """silu(x[gather_idx] @ W_gate) * (x[gather_idx] @ W_up) per group, forward only (inference): on
    the GPU one kernel, SwiGLU in the GEMM's epilogue. See kernels/grouped_gemm.py."""
    fn = grouped_swiglu_triton if use_triton(x_N_K) else grouped_swiglu_reference
    return fn(x_N_K, w_E_K_2I, offsets_E1, gather_idx_M)


def combine(y_M_H: Tensor, weights_N_K: Tensor, unsort_idx: Tensor) -> Tensor:
    """Expert-sorted rows back to token order, summed with the routing weights. See kernels/routing.py."""
    fn = combine_triton if use_triton(y_M_H) else combine_reference
    return fn(y_M_H, weights_N_K, unsort_idx)


def draw(logits_R_V: Tensor, temperature: float, generator: torch.Generator, philox_2: Tensor | None):
    """A token per row from softmax(logits / temperature) (argmax at 0), with its logprob. The torch
    path draws with `generator`; the kernel (which needs philox_2) with Philox. See kernels/sampling.py."""
    if philox_2 is not None and use_triton(logits_R_V):
        return draw_triton(logits_R_V, temperature, philox_2)
    return draw_reference(logits_R_V, temperature, generator)


def paged_decode_attention(q_S_Hq_D: Tensor, k_S_Hkv_D: Tensor, v_S_Hkv_D: Tensor, k_cache: Tensor,
                           v_cache: Tensor, block_tables_S_M: Tensor, positions_S: Tensor) -> Tensor:
    """Each sequence's new token: its k/v into the pool, its query over its cached tokens and itself.
    Triton only for a block size the kernel takes (kernel_fits). See kernels/paged_attention.py."""
    triton_ok = use_triton(q_S_Hq_D) and kernel_fits(k_cache.shape[1])
    fn = paged_decode_attention_triton if triton_ok else paged_decode_attention_torch
    return fn(q_S_Hq_D, k_S_Hkv_D, v_S_Hkv_D, k_cache, v_cache, block_tables_S_M, positions_S)
