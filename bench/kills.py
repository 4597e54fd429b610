"""Does a cascade killed at random moments end exactly where an uninterrupted one does?

    python bench/kills.py                                   # recipes/tiny.toml, shortened, 10 kills
    python bench/kills.py --steps_scale 0.25 --eval_limit 8 --save_every 1 --kills 10 --seed 1

Runs the recipe twice into bench/out/kills/: once uninterrupted (the reference), once killed with
SIGKILL, the whole process group (the cascade, its sandboxes), at --kills random moments and run
again after each, the same command, until it finishes. Then it checks what a user would rely on:
  - the table: RUN/eval.json's rows (scores, judge verdicts, checkpoint paths, stage summaries;
    not the wall times) equal the reference's;
  - the weights: every *.safetensors under RUN (the start, each stage's final, the reward model)
    bitwise equal to the reference's;
  - RUN/metrics.jsonl has each (event, stage) once;
  - no temporary is left (*.tmp-*, *.tmp, *.tmp<pid>, *.old), and no stage keeps last/ beside final/.
Kill moments: --kills points drawn uniformly over the reference's timeline; attempt i is killed
when it reaches point i (placed there by its progress lines, which every run prints alike), so the
kills spread over every part of the run: data, start, each stage's steps, saves and evaluation.
--steps_scale and --eval_limit shorten the run (cascade.py's flags); --save_every sets every
stage's save_every (the recipe's `save_every = N`s) so that kills also land between intermediate
checkpoints (0: as they are). Exit status 1 on a mismatch.
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cascade  # noqa: E402
from common import read_metrics  # noqa: E402

TIMING = {"eval_s", "stage_s", "time", "tokens_per_s"}   # wall-clock figures: not expected to repeat


def with_save_every(path, out, save_every):
    """The recipe, with every `save_every = N` of its stages' args set to save_every (0: kept), as
    out/<its file name>. (A recipe's relative paths are read from ROOT, where the cascade runs.)"""
    text = open(path).read()
    if save_every:
        text = re.sub(r"save_every = \d+", f"save_every = {save_every}", text)
    with open(os.path.join(out, os.path.basename(path)), "w") as f:
        f.write(text)
    return f.name


def start(recipe, run, args):
    cmd = [sys.executable, "cascade.py", "--recipe", recipe, "--run_dir", run, "--steps_scale", str(args.steps_scale),
           "--eval_limit", str(args.eval_limit)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


class Progress:
    """Where a run is, read off its output: the progress lines (a stage's start, its steps, an
    evaluation's result) are the same in every run, so each marks a moment of the reference's
    timeline; between two, the run is where its last one was, plus the time since."""

    def __init__(self):
        self.stage, self.mark, self.at, self.line = None, None, time.time(), "(nothing yet)"

    def key(self, line):
        if m := re.match(r"=== stage (\S+):", line):
            self.stage = m[1]
            return ("start", self.stage)
        if m := re.match(r"eval (\S+):", line):
            return ("eval", m[1])
        if m := re.match(r"(rm )?step (\d+)[/ ]", line):
            return (self.stage, m[1] or "", int(m[2]))
        return None


def follow(proc, log, progress, reference=None):
    """Read the run's output in a thread: each line to the log; with `reference` ({key: moment}), the
    run's place on the reference's timeline updated as progress lines come. Without, the lines'
    moments are recorded (-> the reference's {key: moment})."""
    moments, t0 = {}, time.time()

    def read():
        for line in proc.stdout:
            log.write(line)
            key = progress.key(line.strip())
            if key is not None:
                if reference is None:
                    moments.setdefault(key, time.time() - t0)
                elif key in reference:
                    progress.mark, progress.at, progress.line = reference[key], time.time(), line.strip()
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, moments


def comparable(row):
    out = {k: v for k, v in row.items() if k not in TIMING}
    if "summary" in out:
        out["summary"] = {k: v for k, v in out["summary"].items() if k not in TIMING}
    return out


def weights(run):
    out = {}
    for root, _, files in os.walk(run):
        for f in files:
            if f.endswith(".safetensors"):
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(root, f), run)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def check(ref, run):
    """-> list of problems (empty: the killed run ended where the reference did)."""
    problems = []
    rows_ref = json.load(open(os.path.join(ref, "eval.json")))["rows"]
    rows = json.load(open(os.path.join(run, "eval.json")))["rows"]
    if list(rows) != list(rows_ref):
        problems.append(f"eval.json rows {list(rows)} != reference {list(rows_ref)}")
    for name in rows_ref:
        if name in rows and comparable(rows[name]) != comparable(rows_ref[name]):
            problems.append(f"eval.json row {name!r} differs from the reference")
    if json.load(open(os.path.join(run, "teachers.json"))) != json.load(open(os.path.join(ref, "teachers.json"))):
        problems.append("teachers.json differs")
    w_ref, w = weights(ref), weights(run)
    if sorted(w) != sorted(w_ref):
        problems.append(f"weight files differ: {sorted(set(w) ^ set(w_ref))}")
    problems += [f"{f}: not bitwise equal" for f in sorted(w_ref) if f in w and w[f] != w_ref[f]]
    events = [(r["event"], r["stage"]) for r in read_metrics(os.path.join(run, "metrics.jsonl"))]
    problems += [f"metrics.jsonl: {e} logged {events.count(e)} times" for e in sorted(set(events))
                 if events.count(e) != 1]
    if sorted(events) != sorted((r["event"], r["stage"]) for r in read_metrics(os.path.join(ref, "metrics.jsonl"))):
        problems.append("metrics.jsonl's events differ from the reference's")
    for root, dirs, files in os.walk(run):
        problems += [f"left behind: {os.path.relpath(os.path.join(root, n), run)}" for n in dirs + files
                     if cascade.TEMPORARY.search(n) or n.endswith(".old")]
        if "final" in dirs and "last" in dirs:
            problems.append(f"left behind: {os.path.relpath(os.path.join(root, 'last'), run)} beside final/")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "tiny.toml"))
    p.add_argument("--steps_scale", type=float, default=0.1, help="cascade.py --steps_scale: the run's scale")
    p.add_argument("--eval_limit", type=int, default=4, help="cascade.py --eval_limit: eval prompts per domain")
    p.add_argument("--save_every", type=int, default=2, help="every stage's save_every (0: the recipe's)")
    p.add_argument("--kills", type=int, default=10, help="how many times the run is killed")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "kills"))
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    recipe = with_save_every(args.recipe, args.out, args.save_every)
    ref, run = os.path.join(args.out, "reference"), os.path.join(args.out, "killed")

    t0 = time.time()
    with open(os.path.join(args.out, "reference.log"), "w") as log:
        proc = start(recipe, ref, args)
        thread, reference = follow(proc, log, Progress())
        if proc.wait() != 0:
            sys.exit(f"the reference run failed: see {log.name}")
        thread.join()
    ref_s = time.time() - t0
    print(f"reference: {ref_s:.0f} s (--steps_scale {args.steps_scale}, --eval_limit {args.eval_limit}, "
          f"save_every {args.save_every or 'as in the recipe'}); {len(reference)} progress lines", flush=True)

    # the kill moments: uniform over the reference's timeline, in order; attempt i is killed when it
    # reaches moment i (its first progress line places it; before one, the time since its start)
    rng = random.Random(args.seed)
    moments = sorted(rng.uniform(0.02, 0.98) * ref_s for _ in range(args.kills))
    attempt, killed_s = 0, time.time()
    print(f"{'kill':>4} {'moment s':>9}  the attempt's last progress line", flush=True)
    while True:
        attempt += 1
        log_path = os.path.join(args.out, f"attempt{attempt}.log")
        with open(log_path, "w") as log:
            proc, progress = start(recipe, run, args), Progress()
            thread, _ = follow(proc, log, progress, reference)
            target = moments[attempt - 1] if attempt <= args.kills else None
            while proc.poll() is None:
                now = time.time()
                at = (progress.mark + now - progress.at) if progress.mark is not None else now - progress.at
                if target is not None and at >= target:
                    os.killpg(proc.pid, signal.SIGKILL)   # the cascade and every process it started
                    proc.wait()
                    break
                time.sleep(0.05)
            thread.join()
        if proc.returncode == -signal.SIGKILL:
            print(f"{attempt:>4} {target:>9.1f}  {progress.line[:100]}", flush=True)
            continue
        if proc.returncode != 0:
            sys.exit(f"attempt {attempt} failed (exit status {proc.returncode}): see {log_path}")
        break
    print(f"killed run: {attempt - 1} kills, finished on attempt {attempt}, {time.time() - killed_s:.0f} s in all")
    problems = check(ref, run)
    for line in problems:
        print("MISMATCH:", line)
    n_weights = len(weights(ref))
    print(f"eval.json rows, teachers.json, {n_weights} weight files (bitwise), metrics events, temporaries: "
          + ("all equal, none left" if not problems else f"{len(problems)} problem(s)"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
