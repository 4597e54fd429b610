"""Training-step throughput of model.py, side by side with transformers' Qwen3MoeForCausalLM.

One training step = forward, next-token cross-entropy + router_aux_loss_coef * load-balancing loss,
backward, AdamW step. Both models run the same configuration (configs/bench.json: 215M parameters,
39M active) from the same weights: transformers loads the checkpoint that model.py saves, and the
first-step cross-entropies printed in the table must agree (the column shows the cross-entropy
alone: transformers pools its load-balancing loss over all layers' tokens at once, model.py
averages the per-layer losses, so the totals differ by design; both compute it, so the work is the
same). transformers is run with each of its experts
implementations that loads ("grouped_mm": torch._grouped_mm, its default in 5.x; "eager": a Python
loop over experts).

FLOPs per token (the PaLM / nanochat convention, so MFU figures are comparable across repos):
    6 * N_active                      matmul parameters a token touches (k of E experts, attention,
                                      router, LM head; not the embedding lookup), x2 forward, x4
                                      backward
  + 12 * L * n_heads * head_dim * T   attention scores and values (QK^T and AV, 2 * 2 * T * D per
                                      head and layer in the forward, 3x with the backward), counted
                                      as if not causal: the usual convention
MFU = FLOPs/token * tokens/s / peak, with peak = 989 TFLOP/s (H100 SXM dense bf16).

    python bench/train_step.py                 # GPU: bench config, bf16, 16 x 1024 tokens
    python bench/train_step.py --compile       # also torch.compile our model
    python bench/train_step.py --cpu-smoke     # tiny config, fp32, tiny batch (also without CUDA)
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

H100_BF16_PEAK = 989e12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flops_per_token(model: Transformer, T):
    c = model.config
    n_active = model.num_params(active_only=True)
    if not c.tie_word_embeddings:   # a tied matrix is counted once, as the LM head
        n_active -= model.model.embed_tokens.weight.numel()
    return 6 * n_active + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T


def ours_step_fn(model):
    coef = model.config.router_aux_loss_coef

    def step(x, y):
        logits, aux = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return ce + coef * aux, ce
    return step


def hf_step_fn(model):
    coef = model.config.router_aux_loss_coef

    def step(x, y):
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        return ce + coef * out.aux_loss, ce
    return step


def measure(step, params, batches, warmup, device):
    """Run len(batches) steps; time those after `warmup`. -> (first cross-entropy, s per step)."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_loss = None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        loss, ce = step(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = ce.item()
    sync()
    return first_loss, (time.perf_counter() - t0) / (len(batches) - warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "bench.json"),
                   help="model config.json (default configs/bench.json)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first (allocator, Triton autotuning, compilation)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers even when importable")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny config, fp32, tiny batch, on the CPU (automatic without CUDA)")
    args = p.parse_args(argv)

    if args.cpu_smoke or not torch.cuda.is_available():
        args.config = os.path.join(ROOT, "configs", "tiny.json")
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 3, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    config = ModelConfig.from_json(args.config)
    torch.manual_seed(0)
    ours = Transformer(config).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=gen)
        batches.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
    tokens = args.batch * args.seq
    fpt = flops_per_token(ours, args.seq)
    print(f"config {os.path.relpath(args.config, ROOT)}: {ours.num_params() / 1e6:.1f}M params, "
          f"{ours.num_params(active_only=True) / 1e6:.1f}M active; {device.type} {dtype}; "
          f"batch {args.batch} x {args.seq} tokens; {fpt / 1e9:.3f} GFLOP/token")

    rows = []
    tmp = tempfile.TemporaryDirectory()
    ckpt = os.path.join(tmp.name, "ckpt")
    ours.save_pretrained(ckpt)   # saved before any step: every row starts from the same weights

    def run(name, build, make_step, optional=True):
        try:
            model = build()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            loss, sec = measure(make_step(model), list(model.parameters()), batches, args.warmup,
                                device)
        except Exception as e:   # a missing backend is a row in the table, not a crash
            if not optional:
                raise
            rows.append((name, f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:90]}"))
            return
        cuda = device.type == "cuda"
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        mfu = f"{100 * fpt * tokens / sec / H100_BF16_PEAK:5.1f}%" if cuda else "n/a"
        rows.append((name, f"{tokens / sec:12,.0f} {sec * 1e3:9.1f} {mfu:>6} {mem:8.1f} "
                           f"{loss:9.4f}"))

    def load_ours():
        return Transformer.from_pretrained(ckpt, device, dtype)

    run("nanocascade model.py", load_ours, ours_step_fn, optional=False)
    if args.compile:
        run("nanocascade + torch.compile", lambda: torch.compile(load_ours()), ours_step_fn)
    del ours
    if not args.no_hf:
        try:
            import transformers
        except ImportError:
            rows.append(("transformers", "not importable: skipped"))
        else:
            for impl in ("grouped_mm", "eager"):
                run(f"transformers {transformers.__version__} {impl}",
                    lambda: transformers.Qwen3MoeForCausalLM.from_pretrained(
                        ckpt, dtype=dtype, attn_implementation="sdpa",
                        experts_implementation=impl).to(device), hf_step_fn)
    print(f"\n{'implementation':<34} {'tokens/s':>12} {'ms/step':>9} {'MFU':>6} {'peak GiB':>8} "
          f"{'CE@1':>9}")
    for name, text in rows:
        print(f"{name:<34} {text}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
