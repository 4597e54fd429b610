"""
What every stage shares, in one small place: distributed setup, atomic checkpoints, the learning-rate
schedule and the metrics log. The stage scripts (sft.py, grpo.py, mopd.py, rlhf.py) import these;
nothing here knows about any particular stage.

Checkpoints are Hugging Face layout directories (config.json + model.safetensors + tokenizer.json),
plus, for resuming, optimizer.safetensors and trainer_state.json. They are written into a temporary
directory next to the target and renamed into place, so a crash or a kill never leaves half a
checkpoint: the reader sees either the previous one or the new one.
"""

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python x.py` is one process


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def init_distributed(device="auto"):
    """Join torchrun's process group (gloo on CPU, nccl on GPU) if there is one. Idempotent, so that
    cascade.py can call each stage's main() in the same process group."""
    use_cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" in os.environ and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Dist(rank, world, local_rank, dev, rank == 0)


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


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def unwrap(model):
    """The plain module under a DDP/compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# -----------------------------------------------------------------------------
# atomic directories and checkpoints


def _recover(path):
    # a crash between the two renames in atomic_dir leaves only path.old: that is the last good state
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.rename(path + ".old", path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temporary directory; on success it replaces `path` in two renames."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _recover(path)
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


def save_checkpoint(path, model, tokenizer_path, optimizer=None, state=None):
    """Write an HF-layout checkpoint (+ optimizer and trainer state for resuming), atomically.
    Rank 0 writes; every rank waits for it."""
    if is_main():
        with atomic_dir(path) as tmp:
            unwrap(model).save_pretrained(tmp)  # first: it claims the (empty) directory itself
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
            state = dict(state or {})
            if optimizer is not None:
                opt = optimizer.state_dict()
                tensors = {f"{i}.{k}": v.detach().contiguous().cpu()
                           for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
                save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
                state["optimizer_param_groups"] = opt["param_groups"]
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=1)
    barrier()


def finished_summary(out):
    """The stage contract: OUT/final exists iff the stage ran to the end. -> its stored summary
    (trainer_state.json's "summary"), or None when the stage still has to run."""
    final = os.path.join(out, "final")
    if not checkpoint_exists(final):
        return None
    with open(os.path.join(final, "trainer_state.json")) as f:
        return json.load(f).get("summary", {})


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """-> (model, trainer_state dict). The model class lives in model.py."""
    from model import Transformer
    _recover(path)
    if not checkpoint_exists(path):
        raise FileNotFoundError(f"{path}: no checkpoint here (config.json missing)")
    model = Transformer.from_pretrained(path, device=device, dtype=dtype)
    state_file = os.path.join(path, "trainer_state.json")
    state = json.load(open(state_file)) if os.path.exists(state_file) else {}
    return model, state


def load_optimizer(path, optimizer, state):
    """Restore the optimizer saved by save_checkpoint into a freshly built optimizer."""
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    opt_state = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = v
    groups = state["optimizer_param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups)):
        raise ValueError(f"{path}: optimizer state does not match this model's parameters")
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


# -----------------------------------------------------------------------------
# learning rate and metrics


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

    drop_from_step: a run resumed from a checkpoint first drops the rows with "step" >= this, the
    steps it logged after that checkpoint and is about to log again."""

    def __init__(self, path, drop_from_step=None):
        self.path = path
        if is_main():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if drop_from_step is not None and os.path.exists(path):
                rows = [r for r in read_metrics(path) if r.get("step", -1) < drop_from_step]
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                os.replace(path + ".tmp", path)

    def log(self, row):
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
