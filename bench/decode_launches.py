"""How many kernels one decode step launches on the GPU path, counted on any machine.

    python bench/decode_launches.py                      # configs/bench.json in bf16
    python bench/decode_launches.py --config configs/tiny.json

At batch 256 a decode step is mostly small kernels, each costing a few microseconds of launch and
ramp-up even inside a CUDA graph, so their number matters as much as their speed. On a GPU,
`bench/rollout.py`'s decode-step profile counts them directly. This script counts them anywhere: it
runs one step of a decode burst (`ModelRunner.decode_step`: the forward through the engine's attention
callable, the draw, and the bookkeeping that feeds the next step, which is all that a CUDA graph
replays) on the CPU, under a TorchDispatchMode that records every aten kernel (views and allocations
excluded), and counts the pieces that are Triton on the GPU as the launches they make there: routing
3, a grouped GEMM 1 (with SwiGLU in its epilogue too), the combine 1, paged attention 1 (its k/v
writes included), QK-norm + RoPE 1, the draw 2 (the kernel and its key's step + 1); their torch equivalents compute the values,
uncounted. `F.rms_norm` counts as 1 when input and weight share a dtype (torch fuses it then);
otherwise its decomposition is counted. The table is per op, for the whole step.
"""
import argparse
import collections
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import model_runner  # noqa: E402
import rollout  # noqa: E402
from kernels.sampling import draw_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_KERNELS = {"empty.memory_format", "empty_strided.default", "empty_like.default",
               "new_empty.default", "_unsafe_view.default", "lift_fresh.default",
               "_local_scalar_dense.default"}


class CountKernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.inside = False   # in a piece counted_as its launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and f"{func.overloadpacket.__name__}.{func._overloadname}" not in NOT_KERNELS:
            self.counts[f"aten.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def counted_as(fn, launches, name, counter):
    """fn, run uncounted (pieces counted_as inside it too), recorded as `launches` kernels `name`."""
    def wrapped(*args, **kwargs):
        if counter.inside:
            return fn(*args, **kwargs)
        counter.inside = True
        try:
            with _disable_current_modes():
                out = fn(*args, **kwargs)
        finally:
            counter.inside = False
        counter.counts[name] += launches
        return out
    return wrapped


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench.json"))
    parser.add_argument("--batch", type=int, default=8,
                        help="sequences in the step (the count does not depend on it)")
    args = parser.parse_args()
    counter = CountKernels()
    model.route = counted_as(model.route, 3, "triton routing (3 kernels)", counter)
    model.grouped_mm = counted_as(model.grouped_mm, 1, "triton grouped GEMM", counter)
    model.grouped_swiglu = counted_as(model.grouped_swiglu, 1, "triton grouped GEMM + SwiGLU", counter)
    model.combine = counted_as(model.combine, 1, "triton combine", counter)
    model_runner.paged_decode_attention = counted_as(model_runner.paged_decode_attention, 1,
                                                     "triton paged attention", counter)
    rms_norm = F.rms_norm
    fused_rms_norm = counted_as(rms_norm, 1, "fused rms_norm", counter)
    F.rms_norm = lambda x, shape, weight=None, eps=None: (
        (fused_rms_norm if weight is None or weight.dtype == x.dtype else rms_norm)(x, shape, weight, eps))
    model.use_triton = lambda t: True   # (model.py asks only to choose the kernel below)
    model.qk_norm_rope_triton = counted_as(model.qk_norm_rope, 1, "triton QK-norm + RoPE", counter)
    rollout.draw = counted_as(lambda logits, t, generator, philox_2: draw_reference(logits, t, generator),
                              2, "triton draw (kernel, step + 1)", counter)

    torch.manual_seed(0)
    config = model.ModelConfig.from_json(args.config)
    net = model.Transformer(config).to(torch.bfloat16).eval()
    runner = model_runner.ModelRunner(net, block_size=16, cuda_graphs=False)
    runner.prepare(args.batch + 1, fixed=True)
    S = args.batch   # sequence s: one cached block (block s + 1), its new token at position 4
    generator, params = torch.Generator().manual_seed(0), rollout.SamplingParams(temperature=1.0)
    st = runner.new_state(S, 1, 2)
    st.tables_n_M.copy_(torch.arange(1, S + 1, dtype=torch.int32)[:, None])
    st.inputs_3_n[0].copy_(torch.randint(0, config.vocab_size, (S,)))   # tokens
    st.inputs_3_n[1:].fill_(4)                                          # positions, last positions
    with torch.no_grad():
        sample = lambda logits: rollout.sample(logits, params, generator, runner.philox_2)
        step = lambda: runner.decode_step(st, sample)
        step()   # (first calls may set things up)
        st.j.zero_()
        counter.counts.clear()
        with counter:
            step()
    total, layers = sum(counter.counts.values()), config.num_hidden_layers
    print(f"{os.path.basename(args.config)}: {total} kernel launches per decode step (forward, draw and "
          f"bookkeeping), {total / layers:.1f} per layer ({layers} layers)")
    for name, n in counter.counts.most_common():
        print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
