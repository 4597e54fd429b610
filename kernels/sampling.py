"""Drawing the next token from the logits, in one kernel per decode step (the rollout engine's).

    tokens_R, logprobs_R = draw_triton(logits_R_V, temperature, philox_2)
    tokens_R, logprobs_R = draw_reference(logits_R_V, temperature, generator)

Both draw one token per row from softmax(logits / temperature) and return it with its logprob under
that distribution, log_softmax(logits / temperature)[token]; at temperature 0 the token is the argmax
(the lowest index among ties, as torch's) and the logprob is log_softmax(logits)[token]. A token
whose logit top-k/top-p truncation set to -inf is never drawn.

The reference is torch: a log_softmax over the row, then torch.multinomial on its exp. That is five
or six kernels, each reading or writing the [R, V] logits in fp32, and a seeded torch.Generator,
which needs torch's graph-safe RNG machinery for a replayed CUDA graph to draw new numbers.

The kernel makes one pass over each row (a program per row, or per few rows of a small vocabulary):
  * the Gumbel-max trick: with g_i = -log(-log u_i) for independent uniforms u_i, the index of the
    largest x_i + g_i is distributed as softmax(x). So a draw is a running argmax, with no
    cumulative sum and no second pass;
  * the softmax normalizer log sum_i exp(x_i) with the online rescaling flash attention uses (a
    running max m, and a running sum s of exp(x_i - m) rescaled whenever m grows), so that the
    logprob x_token - m - log s comes out of the same pass;
  * the uniforms from Philox (tl.rand), keyed by philox_2 = [seed, step], an int64 tensor on the
    device, with counter row * V + column. The key is read from memory, not baked into the launch,
    so a CUDA graph that holds this kernel draws new numbers at every replay: after each draw,
    draw_triton adds 1 to step (one more tiny kernel, in the graph too).

Same seed, same draws (on the same kind of GPU), but not the reference's draws: the two paths agree
on the distribution and the logprobs, not on the random numbers (tests/test_kernels.py checks the
distribution by counting).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.grouped_gemm import _interpreting


def draw_reference(logits_R_V: Tensor, temperature: float, generator: torch.Generator):
    logits = logits_R_V.float()
    if temperature == 0:
        tokens_R = logits.argmax(-1)
        return tokens_R, logits.log_softmax(-1).gather(1, tokens_R[:, None])[:, 0]
    logprobs_R_V = (logits if temperature == 1 else logits / temperature).log_softmax(-1)
    tokens_R = torch.multinomial(logprobs_R_V.exp(), 1, generator=generator)[:, 0]
    return tokens_R, logprobs_R_V.gather(1, tokens_R[:, None])[:, 0]


@triton.jit
def _draw_kernel(logits_ptr, stride_r, R, scale, philox_ptr, tokens_ptr, logprobs_ptr,
                 V: tl.constexpr, GREEDY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # BLOCK_R rows per program: 1 for a real vocabulary, more for the tests' small ones
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    # Philox key: seed in the high 32 bits, step in the low 32
    key = (tl.load(philox_ptr).to(tl.uint64) << 32) | (tl.load(philox_ptr + 1).to(tl.uint64) & 0xFFFFFFFF)
    m = tl.full((BLOCK_R,), -3.0e38, tl.float32)   # running max of x (finite: exp(m - m) must not be NaN)
    s = tl.zeros((BLOCK_R,), tl.float32)           # running sum of exp(x - m)
    best = tl.full((BLOCK_R,), float("-inf"), tl.float32)   # the largest x + g so far ...
    best_i = tl.zeros((BLOCK_R,), tl.int32)                 # ... its column ...
    best_x = tl.zeros((BLOCK_R,), tl.float32)               # ... and its x
    for start in tl.range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)[None, :]
        ok = row_ok[:, None] & (cols < V)
        x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_r + cols, mask=ok,
                    other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
        if GREEDY:
            score = x
        else:   # x + Gumbel noise; u = 0 gives -inf, never the argmax
            u = tl.rand(key, rows[:, None] * V + cols)
            score = x - tl.log(-tl.log(u))
        score = tl.where(ok, score, float("-inf"))
        block_best = tl.max(score, 1)
        block_i = tl.min(tl.where(score == block_best[:, None], cols, V), 1)   # lowest column of ties
        take = block_best > best    # strictly: an earlier block wins a tie
        best = tl.where(take, block_best, best)
        best_i = tl.where(take, block_i, best_i)
        best_x = tl.where(take, tl.sum(tl.where(cols == block_i[:, None], x, 0.0), 1), best_x)
    tl.store(tokens_ptr + rows, best_i.to(tl.int64), mask=row_ok)
    tl.store(logprobs_ptr + rows, best_x - m - tl.log(s), mask=row_ok)


def draw_triton(logits_R_V: Tensor, temperature: float, philox_2: Tensor):
    R, V = logits_R_V.shape
    assert R * V < 2**31, f"sampling.py: {R} rows x {V} columns overflow the int32 Philox counter"
    logits = logits_R_V if logits_R_V.stride(1) == 1 else logits_R_V.contiguous()
    tokens_R = torch.empty(R, dtype=torch.long, device=logits.device)
    logprobs_R = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:   # (e.g. an engine step of unfinished prompt chunks: no program to launch, no draw to count)
        return tokens_R, logprobs_R
    # a row in tiles of up to 2048 columns (a 152K vocabulary in 75), and a small vocabulary's
    # 2048 // BLOCK_V rows to a program; under the interpreter, where each op costs per call, tiles
    # of 64 (which also walk a test's small vocabulary in several tiles)
    BLOCK_V = min(64 if _interpreting() else 2048, triton.next_power_of_2(V))
    BLOCK_R = min(2048 // BLOCK_V, triton.next_power_of_2(R))
    _draw_kernel[(triton.cdiv(R, BLOCK_R),)](
        logits, logits.stride(0), R, 1.0 / temperature if temperature > 0 else 1.0, philox_2, tokens_R,
        logprobs_R, V=V, GREEDY=temperature == 0, BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V)
    if temperature > 0:
        philox_2[1:].add_(1)   # the next draw: a new key
    return tokens_R, logprobs_R
