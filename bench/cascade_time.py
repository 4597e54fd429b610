"""Where the default run's time goes: the whole cascade, timed, and its parts.

    python bench/cascade_time.py                              # recipes/tiny.toml into bench/out/cascade_time
    python bench/cascade_time.py --recipe recipes/tiny.toml --seed 1 --steps_scale 0.1 --eval_limit 8

Runs `torchrun --standalone --nproc_per_node=1 cascade.py` in a fresh run directory, as the README's
first command does, timing the whole command (startup included), then
prints one row per part from RUN/eval.json: each stage's training, its MOPD control (if any) and
its held-out evaluation (the prompts of the columns it was scored on), and what is left of the wall
time: building the data and the tokenizer, the start checkpoint, imports and the report. --seed
runs a copy of the recipe with `seed = N` (the three-seed check of the README). Nothing is timed in
the test suite; this is the number the README's "about N minutes" comes from.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeded_copy(recipe, seed, out):
    """The recipe with `seed = N` (the one line a user would change), written beside the run."""
    with open(recipe, "rb") as f:
        tomllib.load(f)   # a broken recipe fails here, before anything runs
    lines = open(recipe).read().splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("seed")), None)
    if at is None:
        raise SystemExit(f"{recipe}: no top-level 'seed = N' line to change")
    lines[at] = f"seed = {seed}"
    path = os.path.join(out, f"seed{seed}.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "tiny.toml"))
    p.add_argument("--seed", type=int, help="run a copy of the recipe with seed = N")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "cascade_time"), help="parent directory")
    p.add_argument("--steps_scale", help="cascade.py's --steps_scale (a quick check of this script)")
    p.add_argument("--eval_limit", help="cascade.py's --eval_limit")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    recipe = args.recipe if args.seed is None else seeded_copy(args.recipe, args.seed, args.out)
    run = os.path.join(args.out, os.path.splitext(os.path.basename(recipe))[0])
    shutil.rmtree(run, ignore_errors=True)   # a fresh run: nothing cached
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",   # = torchrun
           "cascade.py", "--recipe", recipe, "--run_dir", run]
    cmd += ["--steps_scale", args.steps_scale] if args.steps_scale else []
    cmd += ["--eval_limit", args.eval_limit] if args.eval_limit else []
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"cascade.py exited with {proc.returncode}")
    rows = json.load(open(os.path.join(run, "eval.json")))["rows"]
    parts = []
    for name, r in rows.items():
        parts.append((name, "train", r.get("stage_s") or 0.0))
        if "control" in r:
            parts.append((name, "GRPO control", r["control"]["control_s"]))
        parts.append((name, f"eval ({len(r['scores']) + (r['chat_judge'] is not None)} columns)", r["eval_s"]))
    print(f"\ntorchrun {' '.join(cmd[4:])}\n")
    print(f"{'stage':12s} {'part':22s} {'s':>7s} {'share':>6s}")
    for name, part, s in parts:
        print(f"{name:12s} {part:22s} {s:7.1f} {s / wall:6.1%}")
    rest = wall - sum(s for _, _, s in parts)
    print(f"{'-':12s} {'data, start, report':22s} {rest:7.1f} {rest / wall:6.1%}")
    for label, key in [("train", "train"), ("control", "GRPO control"), ("eval", "eval")]:
        s = sum(t for _, part, t in parts if part.startswith(key))
        print(f"{'all':12s} {label:22s} {s:7.1f} {s / wall:6.1%}")
    print(f"{'total':12s} {'wall':22s} {wall:7.1f}   ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
