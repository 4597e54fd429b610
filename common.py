"""
What every stage shares, in one small place: distributed setup, atomic checkpoints, the learning-rate
schedule and the metrics log. The stage scripts (sft.py, grpo.py, mopd.py, rlhf.py) import these;
nothing here knows about any particular stage.

Checkpoints are Hugging Face layout directories (config.json + model.safetensors + tokenizer.json),
plus, for resuming, optimizer.safetensors (keyed by parameter name) and trainer_state.json. They are
written into a temporary directory next to the target and renamed into place, so a crash or a kill
never leaves half a checkpoint: the reader sees either the previous one or the new one. A model
sharded with FSDP2 (--fsdp) is gathered first, so its checkpoint is the same full one, and any
checkpoint resumes with or without --fsdp, on any number of ranks.
"""

import argparse
import contextlib
import gc
import glob
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from data.hf import write_hf_files
from model import Block, Transformer

# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python x.py` is one process


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device


def init_distributed(device="auto"):
    """Join torchrun's process group (gloo on CPU, nccl on GPU) if there is one. Idempotent, so that
    cascade.py can call each stage's main() in the same process group."""
    use_cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" in os.environ and not dist.is_initialized():
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise SystemExit(f"LOCAL_RANK {local_rank}, but this node has {torch.cuda.device_count()} CUDA "
                                 f"device(s): run at most that many processes per node (--nproc_per_node), "
                                 f"or on the CPU (--device cpu; a recipe: device = \"cpu\")")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Dist(rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def close_distributed():
    """Leave the process group at the end of a run. FSDP2's modules hold it in reference cycles; they
    are collected first, so that the group is destroyed (its threads joined) now and not during the
    interpreter's teardown (two-rank FSDP runs sometimes aborted at exit: bench/RESULTS.md)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (no-op for one process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def global_sums(values, device):
    """{name: this rank's number} -> {name: the sum over ranks}, in one all-reduce."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    return dict(zip(values, all_reduce_sum(t).tolist()))


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): for a model whose training state does not fit on one GPU. Every rank keeps 1/W of
# each parameter, of its gradient and of its AdamW moments (16 bytes per parameter in fp32 become
# 16/W); a transformer block's full weights exist only while it runs (all-gathered just before its
# forward and its backward; its gradient reduce-scattered right after). Only trained models are
# sharded; frozen ones (MOPD teachers, the KL reference, the reward model during RL, evaluation)
# stay plain modules, and rollouts gather the policy's full weights (full_parameters), so the
# weights themselves must fit.


def shard(model, device):
    """Shard a model in place with FSDP2: each transformer Block is one all-gather unit, the root
    (embeddings, final norm, LM head, a reward head) another; gradients summed over ranks, as
    sync_grads sums them without FSDP. Returns the model."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)   # also moves the (CPU-loaded) parameters to the mesh's device
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)          # sum over ranks, not mean
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-scaled one)
    return model


def sync_grads(params):
    """Sum (not average, as DDP would) gradients over ranks: each rank's loss is already divided by the
    *global* token count, so the sum is the gradient of the global token-mean loss. Under FSDP
    (sharded parameters) the backward has already summed them (shard)."""
    if dist.is_initialized() and not any(isinstance(p, DTensor) for p in params):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = all_reduce_sum(torch.cat([g.flatten() for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()


def is_sharded(model):
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_parameters(model):
    """Gather every block's full weights once and keep them for the duration: the rollout engine
    runs hundreds of forwards of a few tokens each, and all-gathering every layer for each would cost
    far more than the decoding. A collective: every rank enters, even one with nothing to generate.
    A plain module: nothing to do."""
    if not is_sharded(model):
        yield
        return
    model.set_reshard_after_forward(False)   # recursive: forwards keep what is gathered here
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)   # FSDP2's default for the root


def clip_grad_norm(params, max_norm, where="a training step"):
    """Clip the global gradient norm to max_norm; -> the norm before clipping, a plain tensor (under
    FSDP the gradients are shards and torch returns a DTensor). A norm that is not finite raises,
    before the optimizer step that would write NaNs into the weights (and then a checkpoint);
    `where` ("OUT: step N") names the stage and the step in the message."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    if not torch.isfinite(norm):
        raise FloatingPointError(f"{where}: the gradient norm is {norm.item()}: the training diverged; "
                                 f"stopped before the optimizer step (OUT/last, if any, holds the last "
                                 f"good weights: lower --lr and run again)")
    return norm


# Weights this large are a blow-up, not training: a transformer's weights are of order 1 or less
# (norm gains near 1, matrices near 1/sqrt(width)), while Adam moves each weight by about the learning
# rate per step (SFT at --lr 1e6 reaches max |w| 1e6 in one step: tests/test_run_dir.py). Such a
# model scores 0, and the NaN comes a stage later, where it would be blamed.
WEIGHT_LIMIT = 1e4


def check_weights(model, where):
    """Raise if a weight is not finite or beyond WEIGHT_LIMIT: the stage that diverged stops where it
    happened, naming itself and the step (`where`), before a rollout samples from NaN logits or a
    checkpoint keeps the weights for every rerun to resume from. Every rank calls it (under FSDP each
    checks its shard; the verdict is all-reduced, so every rank raises together)."""
    worst = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        w = (p.to_local() if isinstance(p, DTensor) else p).detach()
        if w.numel():   # (a rank's shard of a small tensor can be empty)
            worst = torch.maximum(worst, w.abs().amax().float())   # (NaN wins)
    worst = torch.where(torch.isfinite(worst), worst, torch.inf)   # (a MAX all-reduce keeps inf)
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if worst.item() > WEIGHT_LIMIT:
        raise FloatingPointError(f"{where}: the weights blew up (max |w| {worst.item():.3g} > {WEIGHT_LIMIT:.0e}, "
                                 f"inf where not finite): the training diverged; lower --lr and run again")


def kill_point(name):
    """Fault injection for the kill tests (tests/test_run_dir.py): with NANOCASCADE_KILL_AT=<name> in
    the environment the process SIGKILLs itself here, as a power cut or `kill -9` would, at a moment
    chosen to the line. (bench/kills.py kills at random moments instead.)"""
    if os.environ.get("NANOCASCADE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# -----------------------------------------------------------------------------
# atomic directories and checkpoints


def _recover(path):
    """A crash between the two renames in atomic_dir leaves only path.old: the last good state. Every
    rank may get here at once (on a shared disk one rename wins; the others find it done)."""
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        try:
            os.rename(path + ".old", path)
        except FileNotFoundError:   # another rank renamed it first
            pass


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temporary directory; on success it replaces `path` in two renames. One writer
    per path (rank 0): the temporary directories of writes that were killed are deleted first."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _recover(path)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):  # data on disk before the rename makes it visible
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path + ".old", ignore_errors=True)
        os.rename(path, path + ".old")
    os.rename(tmp, path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def checkpoint_exists(path):
    _recover(path)
    return os.path.isfile(os.path.join(path, "config.json"))


GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)   # whole tensors, on rank 0's CPU


def full_state_dict(model):
    """The model's whole state dict on rank 0 ({} on the others). Every rank must call it: under
    FSDP it all-gathers the shards."""
    return get_model_state_dict(model, options=GATHER)


def save_checkpoint(path, model, tokenizer_path, optimizer=None, state=None):
    """Write an HF-layout checkpoint (+ optimizer and trainer state for resuming), atomically.
    Every rank calls it (FSDP gathers); rank 0 writes; every rank waits for it."""
    check_weights(model, f"{path}: not saved: at step {(state or {}).get('step')}")
    model_state = full_state_dict(model)
    # the optimizer's state keyed by parameter name ("model.norm.weight.exp_avg"), not by position
    opt = get_optimizer_state_dict(model, optimizer, options=GATHER) if optimizer else None
    if is_main():
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, model_state)  # first: it claims the (empty) directory
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
            write_hf_files(tmp, tokenizer_path)  # chat template, eos/pad, sampling: for HF tools
            state = dict(state or {})
            if opt is not None:
                tensors = {f"{name}.{k}": v.detach().contiguous().cpu()
                           for name, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
                save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
                state["optimizer_param_groups"] = opt["param_groups"]
            write_json(os.path.join(tmp, "trainer_state.json"), state)
    barrier()


def check_same_args(path, state, args, keys):
    """A resumed run continues the one it resumes: the arguments that decide its data and batches
    (`keys`) must be those `path` was written with."""
    saved = state.get("args", {})
    for key in keys:
        if key in saved and saved[key] != getattr(args, key):
            raise ValueError(f"{path} was written with --{key} {saved[key]}, this run has "
                             f"{getattr(args, key)}: same arguments, or a fresh --out")


def save_final(out, model, tokenizer_path, state):
    """OUT/final (the stage contract: it exists iff the stage ran to the end), then OUT/last goes: final
    supersedes it, and it holds the optimizer's state too (about 3x the model)."""
    save_checkpoint(os.path.join(out, "final"), model, tokenizer_path, state=state)
    kill_point(f"final_saved:{os.path.basename(os.path.abspath(out))}")
    if is_main():
        remove_last(out)


def remove_last(out):
    """Delete OUT/last in one rename and then a removal: a kill in the middle leaves a
    last.tmp-removed (which atomic_dir and cascade.py sweep), never a last/ missing half its files."""
    last = os.path.join(out, "last")
    _recover(last)
    if os.path.exists(last):
        shutil.rmtree(last + ".tmp-removed", ignore_errors=True)
        os.rename(last, last + ".tmp-removed")
        shutil.rmtree(last + ".tmp-removed")


def finished_summary(out):
    """The stage contract: OUT/final exists iff the stage ran to the end. -> its stored summary
    (trainer_state.json's "summary"), or None when the stage still has to run. A last/ that a kill
    left behind final (save_final had not removed it yet) goes now."""
    final = os.path.join(out, "final")
    if not checkpoint_exists(final):
        return None
    if is_main():
        remove_last(out)
    return read_json(os.path.join(final, "trainer_state.json")).get("summary", {})


def read_json(path):
    """A JSON object this project wrote (trainer_state.json, eval.json, ...). A file cut short, or
    edited into something else, is an error that names it."""
    with open(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def write_json(path, obj):
    """Atomic: write a temp file, then rename it over the old one; a kill never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """-> (model, trainer_state dict)."""
    if not checkpoint_exists(path):
        raise FileNotFoundError(f"{path}: no checkpoint here (config.json missing)")
    model = Transformer.from_pretrained(path, device=device, dtype=dtype)
    state_file = os.path.join(path, "trainer_state.json")
    return model, read_json(state_file) if os.path.exists(state_file) else {}


def read_tensors(file, device="cpu"):
    """A safetensors file's tensors; a file cut short or of another format is an error naming it."""
    try:
        return load_file(file, device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def load_optimizer(path, model, optimizer, state):
    """Restore the optimizer saved by save_checkpoint into a freshly built optimizer of `model`
    (plain or sharded: under FSDP every rank keeps its shard of the whole saved state)."""
    opt_state = {}
    for key, v in read_tensors(os.path.join(path, "optimizer.safetensors")).items():
        name, k = key.rsplit(".", 1)
        opt_state.setdefault(name, {})[k] = v
    if "optimizer_param_groups" not in state:
        raise ValueError(f"{path}/trainer_state.json: no optimizer state to resume from")
    groups = state["optimizer_param_groups"]
    name_of = {id(p): n for n, p in model.named_parameters()}
    ours = [[name_of.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    if [g["params"] for g in groups] != ours:
        raise ValueError(f"{path}: the saved optimizer state is for other parameters than this "
                         f"optimizer's (saved: {[len(g['params']) for g in groups]} per group, "
                         f"here: {[len(g) for g in ours]}); it does not match")
    set_optimizer_state_dict(model, optimizer, {"state": opt_state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=is_sharded(model)))


# -----------------------------------------------------------------------------
# arguments, learning rate and metrics


def positive(cast, zero_ok=False, at_most=math.inf):
    """An argparse type for finite numbers that must be > 0 (>= 0 with zero_ok; <= at_most):
    `--group_size 0` is an error naming the flag at once, not a division by zero after the first
    rollout, and a negative --grad_clip is not a clip factor that turns every gradient around."""
    def parse(text):
        value = cast(text)
        low_ok = value >= 0 if zero_ok else value > 0   # (NaN fails both)
        if not (low_ok and value <= at_most and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>= 0' if zero_ok else '> 0'}"
                                             + (f" and <= {at_most}" if at_most < math.inf else ""))
        return value
    parse.__name__ = cast.__name__   # (argparse names the type in its messages)
    return parse


pos_int, nonneg_int, pos_float, nonneg_float = (positive(int), positive(int, zero_ok=True),
                                                positive(float), positive(float, zero_ok=True))


def at_least(minimum, why):
    """An argparse type for integers >= minimum; `why` says, in the error, what a smaller one breaks."""
    def parse(text):
        value = pos_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: must be >= {minimum} ({why})")
        return value
    parse.__name__ = "int"
    return parse


def lr_at(step, total, warmup, peak, final_frac=0.1, schedule="cosine"):
    """Linear warmup to `peak`, then cosine down to final_frac * peak (or constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class MetricsLogger:
    """One JSON object per line per step (rank 0 only); appends, so a resumed run keeps its history.
    "step" is the stage's own count: SFT's rows are numbered from 1 (steps done after the update),
    the RL stages' from 0 (the step's index, as `range(steps)` gives it).

    drop_from_step: a run resumed from a checkpoint first drops the rows with "step" >= this, the
    steps it logged after that checkpoint and is about to log again. An existing log is rewritten
    either way, without a last line that a kill cut short (new rows would be appended to it)."""

    def __init__(self, path, drop_from_step=None):
        self.path = path
        if is_main():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.exists(path):
                rows = [r for r in read_metrics(path)
                        if drop_from_step is None or r.get("step", -1) < drop_from_step]
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                os.replace(path + ".tmp", path)

    def log(self, row):
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


def read_metrics(path):
    """The rows of a metrics log. A last line cut short (a crash in mid-write) is left out; any other
    line that is not JSON is an error naming it."""
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i + 1 < len(lines):
                raise ValueError(f"{path}:{n}: not a JSON line: {line[:80]!r}") from None
    return rows
