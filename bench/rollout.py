"""Rollout throughput: rollout.Engine against two baselines on the same weights, and the engine's
decode step against its memory-bandwidth floor.

    python bench/rollout.py               # GPU: configs/bench.json in bf16, the RL-shaped workload
    python bench/rollout.py --cpu-smoke   # a tiny version on the CPU (the default without CUDA)

Workload (GPU defaults): 256 prompts of 128 random tokens, 8 samples each, exactly 256 new tokens per
sample (no stop tokens, so every path does the same work), temperature 1. Rows of the first table:
    paged engine     rollout.Engine: prompt prefilled once per group, continuous batching, paged KV,
                     Triton decode attention, CUDA graphs for decode steps, decode bursts of 16
                     steps per host sync (and the same with one step per sync: decode_burst=1)
    static KV loop   a plain generate loop written here: the 2048 sequences as one static batch with
                     a preallocated contiguous [L, B, Hkv, len, D] cache, through the model's own
                     `attention` hook (prefill in row chunks, then one [B, 1] forward per token)
    transformers     Qwen3MoeForCausalLM.generate on the checkpoint model.py saves (skipped when
                     transformers is not installed)
Times are wall clock of the whole call (prefill included) after a warmup run, with a sync.

Decode step vs bandwidth floor. The step time at batch B is measured as the difference of two
generate calls (B prompts, n=1) with M1 and M2 new tokens, divided by M2 - M1: prefill cancels, and
the extra steps see an average context C = prompt + (M1 + M2) / 2. The floor is the time to read,
once, every byte the step must read from HBM at 3.35e12 B/s (H100 SXM):
    bytes = weights + kv
    weights = every non-expert weight (attention, norms, routers, lm_head) + B embedding rows
              + per MoE layer: E_hit * 3 * H * I * itemsize, where E_hit = E * (1 - (1 - k/E)^B) is the
                expected number of the E experts that B tokens' top-k choices touch (uniform routing)
    kv      = B * C * layers * 2 * Hkv * D * itemsize            (k and v of every cached token)
    floor   = bytes / 3.35e12
Compute (2 * active params * B FLOPs) is far below the H100's bf16 peak at these sizes, so bytes
are the bound. ratio = measured / floor; the target is <= 3 at B >= 256.

Decode step profile. For each batch of the decode table, torch.profiler's account of one decode
step: how many kernels it launches and which take the GPU's time (decode_profile).

Host cost. The last table runs the engine over a stub model that does no math (zero logits over 16
tokens): what is left is the engine's own bookkeeping per decode step (scheduling, block tables,
sampling, appending tokens, and on a GPU a CUDA graph replay per step), which the GPU waits for
unless it is small next to the step. Measured with one host sync per step (decode_burst=1) and per
burst of 16.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from model_runner import ModelRunner  # noqa: E402
from rollout import Engine, SamplingParams, sample  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HBM_BYTES_PER_S = 3.35e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


@torch.no_grad()
def static_kv_generate(model, prompts_B_P, new_tokens, seed, prefill_rows=128):
    """The plain baseline: one static batch, one contiguous preallocated KV cache, no sharing."""
    c = model.config
    B, P = prompts_B_P.shape
    dev, dtype = prompts_B_P.device, next(model.parameters()).dtype
    k_cache = torch.zeros(c.num_hidden_layers, B, c.num_key_value_heads, P + new_tokens, c.head_dim,
                          dtype=dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)

    def attention_at(rows, pos, T):
        def attention(layer, q_B_Hq_T_D, k_B_Hkv_T_D, v_B_Hkv_T_D):
            k_cache[layer, rows, :, pos:pos + T] = k_B_Hkv_T_D
            v_cache[layer, rows, :, pos:pos + T] = v_B_Hkv_T_D
            keys, values = k_cache[layer, rows, :, :pos + T], v_cache[layer, rows, :, :pos + T]
            # prefill starts at position 0, so SDPA's top-left causal mask is the right one;
            # a decode token is the last position and sees everything
            return F.scaled_dot_product_attention(q_B_Hq_T_D, keys, values, is_causal=T > 1, enable_gqa=True)
        return attention

    model.eval()
    generator = torch.Generator(device=dev).manual_seed(seed)
    params = SamplingParams(temperature=1.0)
    logits = torch.cat([
        model(prompts_B_P[r:r + prefill_rows], attention=attention_at(slice(r, r + prefill_rows), 0, P),
              logits_index=torch.arange(min(prefill_rows, B - r), device=dev) * P + P - 1)[0]
        for r in range(0, B, prefill_rows)])
    out = []
    for step in range(new_tokens):
        token_B, _ = sample(logits, params, generator)
        out.append(token_B)
        if step + 1 < new_tokens:
            positions = torch.full((B, 1), P + step, device=dev)
            attention = attention_at(slice(None), P + step, 1)
            logits = model(token_B[:, None], positions, attention=attention)[0][:, 0]
    return torch.stack(out, 1)


def load_hf(model):
    """transformers' Qwen3MoeForCausalLM from the checkpoint our model saves; None without transformers."""
    try:
        from transformers import Qwen3MoeForCausalLM
    except ImportError:
        return None
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "ckpt"))
        try:   # transformers 5.x spells it dtype, 4.x torch_dtype
            hf = Qwen3MoeForCausalLM.from_pretrained(os.path.join(tmp, "ckpt"), dtype=dtype)
        except TypeError:
            hf = Qwen3MoeForCausalLM.from_pretrained(os.path.join(tmp, "ckpt"), torch_dtype=dtype)
    return hf.to(next(model.parameters()).device).eval()


@torch.no_grad()
def hf_generate(hf, prompts_B_P, new_tokens, n):
    return hf.generate(prompts_B_P, attention_mask=torch.ones_like(prompts_B_P), do_sample=True,
                       temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, num_return_sequences=n, pad_token_id=0)


class StubModel(torch.nn.Module):
    """The engine's interface (config, parameters, forward) with no math behind it."""
    def __init__(self, config, device):
        super().__init__()
        self.config, self.dummy = config, torch.nn.Parameter(torch.zeros(1, device=device))

    def forward(self, ids_1_N, positions_1_N=None, attention=None, logits_index=None):
        shape = (len(logits_index),) if logits_index is not None else ids_1_N.shape
        return self.dummy.new_zeros(*shape, 16), None


def host_cost(config, device, batch_sizes, new_tokens=64, prompt_len=16):
    """ms per decode step and us per sequence per step of the engine's bookkeeping alone."""
    print(f"engine host cost per decode step (stub model, no math; {new_tokens} new tokens per sequence)")
    print(f"{'batch':>6s} {'burst':>6s} {'step ms':>8s} {'us/seq':>7s}")
    stub = StubModel(config, device)
    for B in batch_sizes:
        for burst in (1, 16):
            engine = Engine(stub, max_seqs=B, max_batch_tokens=max(16384, B * prompt_len), decode_burst=burst)
            run = lambda: engine.generate([[1] * prompt_len] * B, SamplingParams(max_new_tokens=new_tokens))
            run()   # warm: the pool is allocated
            seconds, _ = timed(run, device)
            step = seconds / engine.stats["steps"]
            print(f"{B:6d} {burst:6d} {step * 1e3:8.2f} {step / B * 1e6:7.2f}")
            engine.release()


def decode_profile(model, B, context, device, steps=10, top=12):
    """Where one decode step's time goes: torch.profiler over `steps` eager decode steps (the whole
    step a CUDA graph holds: forward, sampling, bookkeeping) of B sequences at `context` cached
    tokens. Eager runs the same kernels as the CUDA graph, so the kernel count and the kernel times
    are the graph's; what eager adds, the gaps between launches, is left out. On the CPU: aten ops
    instead of kernels."""
    runner = ModelRunner(model, block_size=16, cuda_graphs=False)
    blocks = -(-context // runner.block_size)
    runner.prepare(B * blocks + 1, fixed=True)
    generator, params = torch.Generator(device).manual_seed(0), SamplingParams()
    st = runner.new_state(B, blocks, steps + 1)
    # sequence s: blocks s*blocks+1..., fed at its last position
    st.tables_n_M.copy_(torch.arange(1, B * blocks + 1, device=device, dtype=torch.int32).view(B, blocks))
    st.inputs_3_n[0].copy_(torch.randint(0, model.config.vocab_size, (B,), device=device))   # tokens
    st.inputs_3_n[1:].fill_(context - 1)                                             # positions, last
    step = lambda: runner.decode_step(st, lambda logits: sample(logits, params, generator, runner.philox_2))
    with torch.no_grad():
        step()
        sync(device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(device)
    runner.release()
    if device.type == "cuda":
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        what = "kernels"
    else:   # top-level aten ops
        events = [e for e in prof.events() if e.name.startswith("aten::")
                  and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
        what = "aten ops"
    by_name = {}
    for e in events:
        calls, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    total_us = sum(us for _, us in by_name.values()) / steps
    print(f"decode step profile, batch {B}, context {context}: {len(events) / steps:.0f} {what} per step, "
          f"{total_us:.0f} us of {what} per step")
    print(f"{'calls/step':>10s} {'us/call':>8s} {'us/step':>8s} {'share':>6s}  name")
    for name, (calls, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{calls / steps:10.1f} {us / calls:8.1f} {us / steps:8.1f} {us / steps / total_us:6.1%}  {name[:70]}")
    print()


def decode_floor_s(model, B, context, cache_itemsize):
    """The bandwidth floor of one decode step (module docstring)."""
    c = model.config
    itemsize = next(model.parameters()).dtype.itemsize
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size * itemsize
    total = sum(p.numel() for p in model.parameters()) * itemsize     # a tied embedding counted once
    non_expert = total - n_moe * c.num_experts * per_expert
    if not c.tie_word_embeddings:   # only the B looked-up rows of an untied embedding are read
        non_expert -= (c.vocab_size - B) * c.hidden_size * itemsize
    e_hit = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** B)
    weights = non_expert + n_moe * e_hit * per_expert
    kv = B * context * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * cache_itemsize
    return (weights + kv) / HBM_BYTES_PER_S


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny config, tiny workload, on the CPU (automatic without CUDA)")
    parser.add_argument("--config", default=None,
                        help="model config (default configs/bench.json; configs/tiny.json for --cpu-smoke)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hf-prompts", type=int, default=None,
                        help="prompts for the transformers row (default: all; it is the slow one)")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--no-graphs", action="store_true", help="disable the engine's CUDA graphs")
    args = parser.parse_args()
    cpu = args.cpu_smoke or not torch.cuda.is_available()
    if cpu:
        args.prompts, args.prompt_len, args.n, args.new_tokens = 4, 16, 2, 8
        args.decode_batches = [4]
        torch.set_num_threads(1)   # tiny ops: a second intra-op thread only spin-waits
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    config = args.config or os.path.join(ROOT, "configs", "tiny.json" if cpu else "bench.json")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelConfig.from_json(config)).to(dtype).eval()
    V, P, G, M = model.config.vocab_size, args.prompt_len, args.n, args.new_tokens
    prompts_B_P = torch.randint(0, V, (args.prompts, P), device=device)
    prompts = prompts_B_P.tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=M)   # no stop ids: every sample runs to M
    engine = Engine(model, max_seqs=max(args.prompts * G, max(args.decode_batches)),
                    max_batch_tokens=16384, cuda_graphs=False if args.no_graphs else None)
    print(f"device: {torch.cuda.get_device_name() if not cpu else 'cpu'}, torch {torch.__version__}, "
          f"{os.path.basename(config)} {str(dtype).removeprefix('torch.')}, "
          f"{model.num_params() / 1e6:.1f}M params ({model.num_params(active_only=True) / 1e6:.1f}M active)")
    print(f"workload: {args.prompts} prompts x {P} tokens, {G} samples each, {M} new tokens per sample\n")

    rows = []
    # warmup: Triton compiles and autotunes, CUDA graphs are captured
    engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4), n=G)
    for burst in (1, 16):   # 16 (the default) last: its stats are printed
        engine.decode_burst = burst
        seconds, out = timed(lambda: engine.generate(prompts, params, n=G, seed=1), device)
        assert all(len(s.token_ids) == M for group in out for s in group)
        rows.append((f"paged engine, burst {burst}", args.prompts * G, seconds))
    stats = engine.stats
    engine.release()

    repeated_B_P = prompts_B_P.repeat_interleave(G, dim=0)
    static_kv_generate(model, repeated_B_P[:64], 4, seed=0)   # warmup
    seconds, tokens = timed(lambda: static_kv_generate(model, repeated_B_P, M, seed=1), device)
    assert tokens.shape == (args.prompts * G, M)
    rows.append(("static KV loop (same hook)", args.prompts * G, seconds))

    hf_prompts = args.hf_prompts or args.prompts
    hf = load_hf(model)
    if hf is None:
        print("transformers is not installed: no transformers row")
    else:
        hf_generate(hf, prompts_B_P[:2], 2, 1)   # warmup
        seconds, tokens = timed(lambda: hf_generate(hf, prompts_B_P[:hf_prompts], M, G), device)
        assert tokens.shape == (hf_prompts * G, P + M)
        rows.append(("transformers generate", hf_prompts * G, seconds))
        del hf
        if not cpu:
            torch.cuda.empty_cache()

    hf_rate = next((seqs * M / s for name, seqs, s in rows if name.startswith("transformers")), None)
    print(f"{'path':28s} {'sequences':>9s} {'new tok':>8s} {'seconds':>8s} {'tok/s':>10s} {'vs HF':>7s}")
    for name, seqs, s in rows:
        rate = seqs * M / s
        print(f"{name:28s} {seqs:9d} {M:8d} {s:8.2f} {rate:10.0f} "
              f"{rate / hf_rate if hf_rate else float('nan'):6.1f}x")
    print(f"engine stats: {stats}\n")

    # decode step time at batch B vs its bandwidth floor
    m1, m2 = max(1, M // 4), max(2, 3 * M // 4)
    print(f"decode step (difference of {m2}- and {m1}-token runs, n=1, prompts of {P} tokens)")
    print(f"{'batch':>6s} {'context':>8s} {'step ms':>8s} {'floor ms':>9s} {'ratio':>6s}")
    for B in args.decode_batches:
        batch_prompts = torch.randint(0, V, (B, P), device=device).tolist()
        times = []
        for m in (m1, m2):
            engine.generate(batch_prompts, SamplingParams(temperature=1.0, max_new_tokens=m), seed=0)  # warm
            times.append(timed(lambda: engine.generate(batch_prompts, SamplingParams(temperature=1.0,
                                                       max_new_tokens=m), seed=0), device)[0])
        step = (times[1] - times[0]) / (m2 - m1)
        context = P + (m1 + m2) / 2
        floor = decode_floor_s(model, B, context, engine.runner.k_cache.dtype.itemsize)
        print(f"{B:6d} {context:8.0f} {step * 1e3:8.3f} {floor * 1e3:9.3f} {step / floor:6.1f}")
        engine.release()
    print()
    for B in args.decode_batches:
        decode_profile(model, B, P + M // 2, device)
    host_cost(model.config, device, [256, 2048])


if __name__ == "__main__":
    main()
