"""
The cascade: Nemotron-Cascade 2's post-training recipe, one stage after another, in one loop.

The paper (arXiv 2603.19220; docs/paper.md) post-trains in a fixed order, SFT -> IF-RL -> multi-domain RL -> MOPD ->
RLHF -> long-context RL -> code RL -> SWE RL, each stage starting from the previous one's final checkpoint with its own
hyperparameters, and MOPD pulling every domain back to the best checkpoint so far on it.
A recipe (recipes/*.toml) lists the stages; for each one, in order, this file
  1. skips it if its row is in RUN/eval.json (scores and summary) and RUN/stages/<name>/final
     exists, else calls <script>.main([...]) in-process, in the same torchrun process group (a
     stage killed midway resumes from RUN/stages/<name>/last; one killed after its final checkpoint
     returns its stored summary; a stage whose directory was deleted is trained and evaluated afresh);
  2. evaluates every domain on its held-out prompts, greedy, with the domain's verifier: math with
     and without thinking, chat as the hidden judge's win rate against the SFT checkpoint's answers
     (ties count 1/2; ArenaHard is a judged win rate too); cached in RUN/eval.json, so the same
     command run again after a kill recomputes nothing;
  3. keeps the teacher registry RUN/teachers.json, the best checkpoint per domain so far (ties keep
     the earlier one): a MOPD stage gets its --teachers from it. A MOPD stage with a `control`
     table also has a GRPO run from its start on its prompts (run_control), scored beside it.
The run directory has one writer at a time (RUN/.lock), no temporaries from a kill (swept at start),
and records that name its checkpoints relative to it (a run can be copied or moved).
The whole recipe is checked first: every key, its value's type, and each stage's arguments by that
stage's own argparse parser (no abbreviations).
RUN/report.md has the stage x domain table (the paper's results table in miniature) with standard
errors, each stage's paired change with its z, wall times, MOPD against its control and, with
matplotlib, PNG curves (report.py). Dropped: the paper's benchmarks (our domains' held-out prompts stand
in) and its separate RLHF-tuned branch as MOPD's chat teacher (ours: the best checkpoint so far).

Distributed: every rank runs every stage (the stages split batches over ranks and sum gradients;
with `fsdp = true` in the recipe, every stage shards the trained model with FSDP2, see common.py);
evaluation is sharded (rank r answers prompts r, r+W, ...; the scores are gathered, so every rank
holds the same table; rank 0 writes the files). Multi-node needs RUN on a shared filesystem.

    torchrun --standalone --nproc_per_node=1 cascade.py  # recipes/tiny.toml, CPU or GPU (or: python cascade.py)
    torchrun --standalone --nproc_per_node=2 cascade.py               # CPU, 2 gloo processes
    torchrun --standalone --nproc_per_node=1 cascade.py --recipe recipes/small.toml   # one GPU
    torchrun --standalone --nproc_per_node=8 cascade.py --recipe recipes/small.toml   # 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=IP --master_port=29500 \\
        cascade.py --recipe recipes/small.toml            # two nodes (node_rank=1 on the other)
    python cascade.py --only_eval runs/tiny/stages/sft/final   # one checkpoint's row of the table
"""

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import socket
import time
import tomllib

import torch
import torch.distributed as dist

import data
import grpo
import mopd
import report
import rl
import rlhf
import sft
import verifiers
from common import (MetricsLogger, barrier, checkpoint_exists, close_distributed, init_distributed, is_main,
                    kill_point, load_checkpoint, pos_float, pos_int, print0, read_json, read_metrics,
                    save_checkpoint, set_seed, write_json)
from model import ModelConfig, Transformer
from rollout import Engine

SCRIPTS = {"sft": sft, "grpo": grpo, "mopd": mopd, "rlhf": rlhf}
# every key a recipe may have, and the type of its value
TOP_KEYS = {"name": str, "model": str, "init": str, "data": str, "build": dict, "seed": int, "device": str,
            "fsdp": bool, "eval": dict, "stage": list}
EVAL_KEYS = {"limit": int, "max_new_tokens": int, "thinking": bool, "domains": list, "samples": int, "sparse": list}
BUILD_KEYS = {"preset": str, "sizes": dict, "vocab_size": int, "doc_lines": int}  # data.build's arguments
STAGE_KEYS = {"name": str, "script": str, "args": dict, "control": dict}
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "a table", list: "a list"}
SET_BY_CASCADE = {"init", "out", "data", "teachers", "config", "device", "fsdp", "seed"}  # the cascade sets these

# ----------------------------------------------------------------------------------------------
# The recipe: read it, check all of it, turn each stage into its command line


class RecipeError(ValueError):
    """A mistake in a recipe; the message names the file and the key."""


def to_argv(args):
    """{"steps": 20, "domains": ["math", "if"], "freeze_router": true} -> ["--steps", "20", ...];
    lists become comma lists, true turns a switch on, false leaves it off."""
    argv = []
    for key, value in args.items():
        if value is not False:
            argv.append(f"--{key}")
            argv += [] if value is True else [",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def load_recipe(path, steps_scale=1.0):
    """Parse and check the whole recipe; every problem is a RecipeError naming the file and the key."""
    def bad(msg):
        raise RecipeError(f"{path}: {msg}")

    def known(table, allowed, where):  # allowed: {key: the type of its value}
        for key, value in table.items():
            if key not in allowed:
                bad(f"{where}unknown key '{key}' (expected one of {sorted(allowed)})")
            if not isinstance(value, allowed[key]) or (allowed[key] is int and isinstance(value, bool)):
                bad(f"{where}{key} = {value!r}: must be {TYPE_NAMES[allowed[key]]}")

    def parse(script, argv, where):  # -> the namespace of `script.py <what the cascade sets> argv`
        parser = SCRIPTS[script].build_parser()
        parser.exit_on_error = False  # a bad value raises ArgumentError instead of exiting
        parser.allow_abbrev = False  # no prefixes: "fsd" must not pass for --fsdp, nor "step" for --steps
        wired = ["--out", "-", "--data", "-", "--init", "-"] + (["--teachers", "-"] if script == "mopd" else [])
        try:
            ns, unknown = parser.parse_known_args(wired + argv)
        except argparse.ArgumentError as e:
            bad(f"{where}{e}")
        if unknown:   # (a key that is no argument, or a value that argparse took for an option)
            bad(f"{where}cannot read {' '.join(unknown)!r} as arguments of {script}.py")
        return ns
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        bad(f"cannot read the recipe ({e})")
    known(recipe, TOP_KEYS, "")
    ev, build = recipe.get("eval", {}), dict(recipe.get("build", {}))
    known(ev, EVAL_KEYS, "[eval]: ")
    known(build, BUILD_KEYS, "[build]: ")
    known(build.get("sizes", {}), dict.fromkeys(data.PRESETS["tiny"]["sizes"], int), "[build] sizes: ")
    if build.get("preset", "tiny") not in data.PRESETS:
        bad(f"[build]: unknown preset '{build['preset']}' (expected one of {sorted(data.PRESETS)})")
    preset = data.PRESETS[build.pop("preset", "tiny")]   # data.build's arguments: the preset's, then [build]'s
    recipe["build"] = {**preset, **build, "sizes": {**preset["sizes"], **build.get("sizes", {})}}
    try:
        data.check_build_args(**recipe["build"])
    except ValueError as e:
        bad(f"[build]: {e}")
    for key in ("limit", "max_new_tokens"):
        if ev.get(key, 1) < 1:
            bad(f"[eval]: {key} = {ev[key]}: must be a positive integer")
    if ev.get("samples", 0) < 0:
        bad(f"[eval]: samples = {ev['samples']}: must be 0 (greedy) or the number of samples per prompt")
    if not ev.get("domains", data.DOMAINS) or any(d not in data.DOMAINS for d in ev.get("domains", [])):
        bad(f"[eval]: domains = {ev['domains']!r}: must be a non-empty list of {list(data.DOMAINS)}")
    if any(d not in ev.get("domains", data.DOMAINS) for d in ev.get("sparse", [])):
        bad(f"[eval]: sparse = {ev['sparse']!r}: must be a list of the evaluated domains")
    if ("model" in recipe) == ("init" in recipe):
        bad("give exactly one of 'model' (a config.json: train from scratch) or 'init' (a checkpoint dir)")
    if recipe.get("device", "auto") not in ("auto", "cpu", "cuda"):
        bad(f"device = {recipe['device']!r}: must be \"auto\", \"cpu\" or \"cuda\"")
    recipe = {"name": os.path.splitext(os.path.basename(path))[0], "seed": 0, "data": "built-in",
              "device": "auto", **recipe}
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", recipe["name"]) or recipe["name"] in (".", ".."):
        bad(f"name = {recipe['name']!r}: letters, digits, ., _ and - only, not '.' or '..' (it names "
            f"runs/<name>; --run_dir puts a run anywhere else)")
    if not recipe.get("stage"):
        bad("no [[stage]] tables: a recipe needs at least one stage")
    names = {"start"}  # the starting point's row in the table
    for i, st in enumerate(recipe["stage"]):
        if not isinstance(st, dict):
            bad(f"stage #{i + 1} = {st!r}: must be a table ([[stage]])")
        where = f"[[stage]] #{i + 1} ({st.get('name', '?')!r}): "
        known(st, STAGE_KEYS, where)
        if "name" not in st or "script" not in st:
            bad(f"{where}needs both 'name' and 'script'")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", st["name"]):
            bad(f"{where}name {st['name']!r}: letters, digits, _ and - only (it names RUN/stages/<name>)")
        if st["name"] in names:
            bad(f"{where}duplicate stage name '{st['name']}' (names must be unique, and not 'start')")
        names.add(st["name"])
        if st["script"] not in SCRIPTS:
            bad(f"{where}unknown script '{st['script']}' (expected one of {sorted(SCRIPTS)})")
        args = dict(st.get("args", {}))
        for key in args.keys() & SET_BY_CASCADE:
            bad(f"{where}argument '{key}' is set by the cascade: remove it from args")
        if "skip_domains" in args:   # (teachers, curves and the report read --domains as what a stage trains)
            bad(f"{where}argument 'skip_domains' is for a MOPD stage's control only (the cascade sets it there)")
        defaults = vars(parse(st["script"], [], where))   # every argument of the script
        for key, value in args.items():
            if key not in defaults:   # (also 'help', whose switch would print and exit)
                bad(f"{where}unknown argument '{key}' for {st['script']}.py (see python {st['script']}.py --help)")
            if isinstance(value, bool) and defaults[key] is not False:   # false would be dropped unseen
                bad(f"{where}{key} = {str(value).lower()}: true/false is for switches; '{key}' takes a value")
        for key in ("steps", "rm_steps"):  # --steps_scale (quick tests): floor 1; 0 means "derive"
            value = args.get(key, defaults.get(key))
            if steps_scale != 1 and isinstance(value, int) and value > 0:
                args[key] = max(1, int(value * steps_scale))
        st["argv"] = to_argv(args)
        st["ns"] = parse(st["script"], st["argv"], where)
        if st["script"] != "sft":
            try:
                rl.domains_and_mix(st["ns"])
                if st["script"] == "mopd":
                    mopd.check_window(st["ns"])
            except ValueError as e:
                bad(f"{where}{e}")
        if "control" in st:   # MOPD's GRPO control: MOPD's arguments that grpo.py has, then its own
            if st["script"] != "mopd" or not st["ns"].eval_every:
                bad(f"{where}control: only for a mopd stage whose args set eval_every (the curves it is compared on)")
            shared = {k: v for k, v in args.items() if k in vars(parse("grpo", [], where))}
            control = {**shared, **st["control"]}
            ns = parse("grpo", to_argv(control), f"{where}control: ")
            if "chat" in ns.domains.split(",") and "skip_domains" not in control:
                # MOPD's very prompts, less chat's: RL never sees the hidden judge (RLHF's reward model comes later)
                control["skip_domains"] = ["chat"]
            st["control_argv"] = to_argv(control)
            ns = parse("grpo", st["control_argv"], f"{where}control: ")
            if "chat" in set(ns.domains.split(",")) - set(ns.skip_domains.split(",")):
                bad(f"{where}control: GRPO on chat would be rewarded by the hidden judge, which RL never sees")
            try:
                rl.domains_and_mix(ns)
            except ValueError as e:
                chat = "chat" in st["ns"].domains.split(",")
                bad(f"{where}control: {e}" + (" (GRPO has no reward for chat: it trains on the prompts of this "
                                              "stage's domains less chat's)" if chat else ""))
        wanted = st["ns"].domains.split(",") if st["script"] == "mopd" else []
        if "domains" in ev and set(wanted) - set(ev["domains"]):  # MOPD's teachers: the best by eval score
            bad(f"{where}MOPD domains {sorted(set(wanted) - set(ev['domains']))} are not in [eval] domains")
    return recipe


# ----------------------------------------------------------------------------------------------
# Evaluation: greedy answers to every domain's held-out prompts, scored by its verifier


def eval_columns(settings):
    """(column, domain, thinking) triples: math twice, with and without thinking."""
    return [col for d in settings["domains"] for col in ([("math", d, True), ("math_nothink", d, False)]
                                                         if d == "math" else [(d, d, settings["thinking"])])]


def evaluate(ckpt, data_dir, settings, dd, domains=None):
    """-> {"scores": {column: mean}, "per_prompt": {column: [score of each prompt]}, "chat_judge": [judge
    score per chat prompt], ...}: rl.evaluate (training's multi-turn tool loop; the sparse domains greedy) on
    each column's prompts (of `domains`, default all), one batch per column (similar lengths, less padding).
    Every prompt's score is kept: the report compares stages prompt by prompt (report.py)."""
    t0 = time.time()
    tok, engine = data.load_tokenizer(ckpt), Engine(load_checkpoint(ckpt, device=dd.device)[0])
    out = {"scores": {}, "per_prompt": {}, "chat_judge": None, "checkpoint": ckpt}
    for column, domain, thinking in eval_columns(settings):
        if domains is not None and domain not in domains:
            continue
        rows = data.load_jsonl(os.path.join(data_dir, "eval", f"{domain}.jsonl"), "rl", domain)[:settings["limit"]]
        rows = [dict(r, thinking=thinking) for r in rows]
        samples = 0 if domain in settings["sparse"] else settings["samples"]   # sparse: greedy, cheaper
        scores = rl.evaluate(engine, tok, rows, settings["max_new_tokens"], dd, samples)
        if column == "chat":
            out["chat_judge"] = scores  # the column is a win rate against the reference: see table()
        else:
            out["scores"][column], out["per_prompt"][column] = sum(scores) / max(1, len(scores)), scores
    engine.release()
    return {**out, "eval_s": round(time.time() - t0, 1)}


def scored_domains(settings, stages, i):
    """The domains stage i is scored on: every one after the first and the last stage; otherwise all
    but [eval] sparse (the costly ones: tool's multi-turn loop, code's and swe's sandbox, longctx's
    long prompts), plus those of the sparse ones the stage trains."""
    st = stages[i]
    if i in (0, len(stages) - 1) or st["script"] == "sft":
        return None
    trained = {"chat"} if st["script"] == "rlhf" else set(st["ns"].domains.split(","))
    return [d for d in settings["domains"] if d not in settings["sparse"] or d in trained]


def latest(scores, names):
    """{column: its score in the last of `names` (table rows) that has it}: a sparse column's last value."""
    return {column: v for name in names for column, v in scores.get(name, {}).items()}


def per_prompt_table(rows, order, reference):
    """{row name: {column: [per-prompt score]}} for the rows evaluated so far, chat as each prompt's
    verdict against `reference` (1 win, 1/2 tie, 0 loss), for report.py's statistics."""
    out = {}
    for name in [n for n in order if n in rows]:
        out[name] = dict(rows[name]["per_prompt"])
        ref = rows.get(reference, {}).get("chat_judge")
        if rows[name]["chat_judge"] is not None and ref is not None:
            out[name]["chat"] = verifiers.chat.wins(rows[name]["chat_judge"], ref)
    return out


def table(rows, order, reference):
    """{row name: {column: score}}: the means of per_prompt_table (chat: the win rate, ties 1/2)."""
    return {name: {c: sum(v) / max(1, len(v)) for c, v in cols.items()}
            for name, cols in per_prompt_table(rows, order, reference).items()}


def regressed(rows, names, reference, best, domains):
    """The domains MOPD must recover, whose curves it and its control draw: those scored lower now
    (the last of `names` that scored them) than by their teacher with paired z <= -3; else those
    scored lower at all; else every one."""
    now = latest(per_prompt_table(rows, names, reference), names)
    teachers = per_prompt_table(rows, [t["stage"] for t in best.values()], reference)
    z = {d: report.paired(now[d], teachers[best[d]["stage"]][d])[2] for d in domains}
    return [d for d in domains if z[d] <= -3] or [d for d in domains if z[d] < 0] or list(domains)


def teacher_registry(rows, candidates, reference):
    """domain -> the earliest of `candidates` with the best score on it: MOPD's teachers."""
    best = {}
    for name, scores in table(rows, candidates, reference).items():
        for domain, score in scores.items():
            # (columns that are no domain are no teacher's: math's is chosen by its thinking-mode
            # score, not math_nothink's; chat is a domain, judged by its win rate)
            if domain in data.DOMAINS and (domain not in best or score > best[domain]["score"]):
                best[domain] = {"stage": name, "checkpoint": rows[name]["checkpoint"], "score": score}
    return best


# ----------------------------------------------------------------------------------------------
# The run directory: one writer at a time, no temporaries left from a kill, paths relative to it


class RunInUse(RuntimeError):
    """Another process is writing the run directory."""


@contextlib.contextmanager
def run_lock(run):
    """Hold RUN/.lock (flock) while the cascade runs: a second cascade into the same directory is
    refused at once, naming the directory and the holder (pid, host, start time, which the holder
    writes into the file). The kernel drops the lock when its process ends, however it ends (kill -9
    too), so a killed run leaves nothing stuck. Rank 0 locks for its whole torchrun job and tells
    the other ranks, which all stop together (a lock per rank would lock rank 0 out); multi-node,
    RUN is on a shared filesystem, where Linux's NFS client turns flock into a cluster-wide lock."""
    refusal = ""
    if is_main():
        os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, ".lock"), "a+") if is_main() else contextlib.nullcontext() as f:
        if f is not None:   # rank 0
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "holder unknown"
                refusal = (f"{run} is in use: another cascade is writing it ({holder}); wait for it to end or stop "
                           f"it, or give this one another --run_dir")
            else:
                f.truncate(0)
                f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%F %T %Z')}\n")
                f.flush()
        if dist.is_initialized():
            box = [refusal]
            dist.broadcast_object_list(box, src=0)
            refusal = box[0]
        if refusal:
            raise RunInUse(refusal)
        yield   # (the lock goes when the file is closed, on the way out)


# what a write killed midway leaves: atomic_dir's NAME.tmp-XXXX (and remove_last's last.tmp-removed),
# write_json's NAME.tmp, data's NAME.tmp<pid>
TEMPORARY = re.compile(r"\.tmp(-.*|\d*)$")


def remove_stale_temporaries(run):
    """Delete the temporaries in what the cascade writes (RUN's files, RUN/start, RUN/data,
    RUN/stages/..., RUN/controls/...): with the lock held, no writer is alive to own one. (Nothing
    else under a --run_dir that holds other things too.)"""
    for root, dirs, files in os.walk(run):
        for name in [n for n in dirs + files if TEMPORARY.search(n)]:
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        dirs[:] = [d for d in dirs if not TEMPORARY.search(d) and (root != run or d in ("start", "data", "stages", "controls"))]


def in_run(run, path):
    """A checkpoint's path as eval.json and teachers.json keep it: relative to RUN when inside it (a
    run can be copied or moved, and its records still name its own checkpoints), else absolute."""
    rel = os.path.relpath(os.path.abspath(path), run)
    return os.path.abspath(path) if rel.split(os.sep)[0] == ".." else rel


def note_args(out, what, script, argv, finished, later=" (and the later stages', which started from it)"):
    """OUT/cascade_args.json: what a stage (or a control) runs with. A finished one is not run again:
    if the recipe now gives it other arguments than those it ran with, say so, and how to rerun it."""
    path, now = os.path.join(out, "cascade_args.json"), {"script": script, "args": argv}
    if not finished and is_main():
        os.makedirs(out, exist_ok=True)
        write_json(path, now)
    was = read_json(path) if finished and os.path.exists(path) else now
    if was != now:
        print0(f"{what} is done ({out}/final), with: {was['script']}.py {' '.join(was['args'])}; "
               f"the recipe now says: {now['script']}.py {' '.join(now['args'])}. Not applied: to rerun "
               f"it with that, delete {out}{later} and run again")


# ----------------------------------------------------------------------------------------------
# The run: data once, the starting point, then every stage followed by its evaluation


def prepare_data(recipe, run):
    """The data directory. Built-in data (and its tokenizer) is generated once, by rank 0: data.build
    returns at once when it is all there, and completes a build that was killed halfway."""
    if recipe["data"] != "built-in":
        if not os.path.isdir(recipe["data"]):
            raise RecipeError(f"data = {recipe['data']!r}: no such directory")
        return recipe["data"]
    data_dir = os.path.join(run, "data")
    if is_main():
        data.build(data_dir, recipe["seed"], **recipe["build"])   # (load_recipe merged the preset in)
    barrier()
    return data_dir


def start_checkpoint(recipe, run, data_dir):
    """The recipe's `init` checkpoint, or (from scratch) a random init of `model`, saved once."""
    if "init" in recipe:
        return recipe["init"]
    start, config = os.path.join(run, "start"), ModelConfig.from_json(recipe["model"])
    exists = checkpoint_exists(start)
    barrier()  # every rank has looked before rank 0 writes it (save_checkpoint waits for all ranks)
    if not exists:   # (data.check_run, called first, has checked that the tokenizer fits its vocab_size)
        set_seed(recipe["seed"])
        save_checkpoint(start, Transformer(config), os.path.join(data_dir, "tokenizer.json"))
    return start


def eval_settings(recipe, data_dir, eval_limit):
    s = {"limit": 32, "max_new_tokens": 128, "thinking": False, "samples": 0, "sparse": [], **recipe.get("eval", {})}
    s.setdefault("domains", [d for d in data.DOMAINS if os.path.exists(os.path.join(data_dir, "eval", f"{d}.jsonl"))])
    return {**s, "limit": s["limit"] if eval_limit is None else eval_limit}


def cached_rows(run, settings):
    """RUN/eval.json's rows, if they were evaluated with these settings (else they do not compare)."""
    path = os.path.join(run, "eval.json")
    cache = read_json(path) if os.path.exists(path) else {}
    return cache["rows"] if cache.get("settings") == settings else {}


def reference(recipe):
    """The chat column's baseline: the SFT checkpoint (the starting point if there is no SFT stage)."""
    return next((st["name"] for st in recipe["stage"] if st["script"] == "sft"), "start")


def run_cascade(recipe, run, settings, data_dir, start, dd):
    """Every stage, then its evaluation (steps 1-3 of the module docstring); a row keeps the stage's
    summary too (what it reports: RLHF's judge and reward-model figures, SFT's loss, ...).
    RUN/metrics.jsonl gets each row's events once, those a kill kept out of it too (an event carries
    its row's "time", when the row was recorded: a retrained stage's row is another)."""
    rows, stages, ref = cached_rows(run, settings), recipe["stage"], reference(recipe)
    order = ["start"] + [st["name"] for st in stages]
    candidates = order if "init" in recipe else order[1:]  # a random init teaches nothing
    metrics_path = os.path.join(run, "metrics.jsonl")
    logged = ({(r.get("event"), r.get("stage"), r.get("time")) for r in read_metrics(metrics_path)}
              if os.path.exists(metrics_path) else set())
    metrics = MetricsLogger(metrics_path)

    def save():   # the eval cache and the teacher registry it implies, always together
        if is_main():
            write_json(os.path.join(run, "eval.json"), {"settings": settings, "rows": rows})
            write_json(os.path.join(run, "teachers.json"), teacher_registry(rows, candidates, ref))

    def log_events(name):   # a row's events in RUN/metrics.jsonl: the stage's summary and its scores
        scores, when = table(rows, order, ref)[name], rows[name].get("time")
        for event, values in [("stage", rows[name].get("summary")), ("eval", scores)]:
            if values is not None and (event, name, when) not in logged:
                wall = {"wall_s": rows[name].get("stage_s")} if event == "stage" else {}
                metrics.log({"event": event, "stage": name, **wall, **values, "time": when})
                logged.add((event, name, when))
        return scores

    def record(name, ckpt, row):
        rows[name] = {**row, "checkpoint": in_run(run, ckpt), "time": round(time.time(), 3)}
        save()
        barrier()
        kill_point(f"recorded:{name}")
        scores = log_events(name)
        print0(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    if "start" not in rows and "init" in recipe:   # a random init answers nothing, at every token cap
        record("start", start, evaluate(start, data_dir, settings, dd))
    for name in [n for n in order if n in rows]:   # rows whose events a kill kept out of the log
        log_events(name)
    prev = start
    for i, st in enumerate(stages):
        name, out = st["name"], os.path.join(run, "stages", st["name"])
        final, finished = os.path.join(out, "final"), checkpoint_exists(os.path.join(out, "final"))
        note_args(out, f"stage {name}", st["script"], st["argv"], finished)
        if not finished and rows.pop(name, None):  # it was deleted to retrain it: evaluate it afresh
            save()
        if name not in rows:
            argv = to_argv({"init": prev, "out": out, "data": data_dir, "seed": recipe["seed"] + i,
                            "device": recipe["device"], "fsdp": recipe.get("fsdp", False)})
            curves = []   # held-out scores every --eval_every steps: the table's prompts, in its chat mode
            if st["script"] == "mopd":  # the teachers: the best checkpoint so far of each domain
                best = teacher_registry(rows, candidates[:candidates.index(name)], ref)
                wanted = st["ns"].domains.split(",")
                if set(wanted) - set(best):
                    raise RecipeError(f"stage {name}: no evaluated checkpoint for {set(wanted) - set(best)}")
                argv += ["--teachers", ",".join(f"{d}={os.path.join(run, best[d]['checkpoint'])}" for d in wanted)]
                before = latest(table(rows, order, ref), order[:i + 1])   # the scores before this stage
                behind = regressed(rows, order[:i + 1], ref, best, wanted)   # what MOPD must recover
                evals = {"prompts": settings["limit"], "domains": behind, "max_new_tokens": settings["max_new_tokens"],
                         "samples": settings["samples"], "greedy": settings["sparse"],   # as the table scores
                         "thinking": "on" if settings["thinking"] else "off",
                         # chat: the judge's win rate against the reference's answers, as in the table
                         "reference": os.path.join(run, rows[ref]["checkpoint"]) if ref in rows else ""}
                curves = to_argv({f"eval_{k}": v for k, v in evals.items()}) if st["ns"].eval_every else []
            print0(f"=== stage {name}: python {st['script']}.py {' '.join(argv + st['argv'])}")
            t0 = time.time()
            summary = SCRIPTS[st["script"]].main(argv + st["argv"] + curves)
            stage_s = None if finished else round(time.time() - t0, 1)   # (a resumed stage: its last run)
            kill_point(f"stage_returned:{name}")
            # a control is a comparison, not a stage: the next stage starts from MOPD's final
            extra = {"control": run_control(st, argv, curves, run, best, before)} if "control" in st else {}
            record(name, final, {**evaluate(final, data_dir, settings, dd, scored_domains(settings, stages, i)),
                                 "stage_s": stage_s, "summary": summary or {}, **extra})
        prev = final
    if is_main():
        write_report(run, recipe, settings, rows, order, ref, candidates)
    barrier()
    return table(rows, order, ref)


def run_control(st, argv, curves, run, best, before):
    """The paper's efficiency claim, measured: GRPO from MOPD's own start, on the same prompts (same
    --seed, --domains, --mix, --prompts_per_step; chat's drawn, then left out: --skip_domains) for the
    same steps, scored on the same held-out prompts every --eval_every steps. RUN/controls/<stage> is
    not in the cascade: nothing starts from it and no teacher comes from it. -> each domain's start,
    teacher, and both held-out curves."""
    out = os.path.join(run, "controls", st["name"])
    done = checkpoint_exists(os.path.join(out, "final"))
    note_args(out, f"the control of {st['name']}", "grpo", st["control_argv"], done, later="")
    control = [a if a != os.path.join(run, "stages", st["name"]) else out for a in argv[:argv.index("--teachers")]]
    print0(f"=== control of {st['name']}: python grpo.py {' '.join(control + st['control_argv'] + curves)}")
    t0 = time.time()
    grpo.main(control + st["control_argv"] + curves)
    domains = curves[curves.index("--eval_domains") + 1].split(",")
    return {"domains": domains, "start": {d: before[d] for d in domains},
            "teacher": {d: best[d]["score"] for d in domains}, "control_s": round(time.time() - t0, 1),
            "mopd": heldout_curves(os.path.join(run, "stages", st["name"]), domains, before),
            "grpo": heldout_curves(out, domains, before)}


def heldout_curves(out, domains, before):
    """{domain: [[updates done, held-out score], ...]} from a stage's metrics (eval/<domain> in the row
    of step s is the score after s + 1 updates), starting at the table's score of the stage before."""
    log = read_metrics(os.path.join(out, "metrics.jsonl"))
    return {d: [[0, before[d]]] + [[r["step"] + 1, r[f"eval/{d}"]] for r in log if f"eval/{d}" in r] for d in domains}


# ----------------------------------------------------------------------------------------------
# The report: the stage x domain table, wall times, teachers, PNG curves where matplotlib is


def write_report(run, recipe, settings, rows, order, ref, candidates):
    per_prompt, cols = per_prompt_table(rows, order, ref), [c for c, _, _ in eval_columns(settings)]
    total = sum((r.get("stage_s") or 0) + r["eval_s"] + r.get("control", {}).get("control_s", 0) for r in rows.values())
    teachers = teacher_registry(rows, candidates, ref).items()
    lines = ["| stage | stage s | eval s |", "|---|---|---|"]
    lines += [f"| {name} | {rows[name].get('stage_s') or '-'} | {rows[name]['eval_s']} |" for name in per_prompt]
    lines += ["", f"Stages, controls and evaluations took {total / 60:.1f} min in all (a resumed stage counts its last "
              "run only). Teachers, the best checkpoint per domain (ties keep the earlier): "
              + ", ".join(f"{d} `{t['stage']}` {t['score']:.3f}" for d, t in teachers), ""]
    for name in [n for n in order if "control" in rows.get(n, {})]:
        lines += report.control_lines(name, rows[name]["control"])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        lines += plot_curves(plt, run, recipe["stage"], rows, table(rows, order, ref), candidates, ref)
    except ImportError:
        lines.append("(matplotlib is not installed: no PNG curves)")
    k = settings["samples"]
    scoring = f"each prompt's score the mean of {k} answers sampled at temperature 1" if k else "greedy decoding"
    intro = (f"Held-out score per domain after each stage (mean ± standard error over {settings['limit']} "
             f"prompts per domain): {scoring}, math with and without thinking, chat = the hidden judge's "
             f"win rate against `{ref}` (a tie counts 1/2)."
             + (" A random init is not scored (it answers nothing)." if "init" not in recipe else "")
             + (f" Scored greedily, and only after the first and last stage and a stage that trains "
                f"them (they cost the most to score): {', '.join(settings['sparse'])}." if settings["sparse"] else ""))
    report.write_report(run, f"nanocascade: {recipe['name']}", intro, per_prompt, cols, lines)


def plot_curves(plt, run, stages, rows, scores, candidates, ref):
    """curves.png: each stage's training reward per domain (SFT: its loss), then each MOPD stage's
    held-out score per domain next to its teachers' and its starting point's, then MOPD's held-out
    curves against its GRPO control's."""
    mopds = [i for i, st in enumerate(stages) if st["script"] == "mopd" and st["name"] in scores]
    controls = [i for i in mopds if "control" in rows[stages[i]["name"]]]
    n = len(stages) + len(mopds) + len(controls)
    fig, axes = plt.subplots((n + 3) // 4, min(4, n), figsize=(12, 2.6 * ((n + 3) // 4)), squeeze=False)
    for ax, st in zip(axes.flat, stages):
        path = os.path.join(run, "stages", st["name"], "metrics.jsonl")
        log = read_metrics(path) if os.path.exists(path) else []
        for k in sorted({k for r in log for k in r if k.startswith("reward")}) or ["loss"]:
            # markers: a series of one point (a one-step stage) draws no line, and would show nothing
            ax.plot([r["step"] for r in log if k in r], [r[k] for r in log if k in r], label=k, lw=1, marker="o", ms=2)
        ax.set_title(st["name"], fontsize=9)
    for ax, i in zip(axes.flat[len(stages):], mopds):
        teachers = teacher_registry(rows, candidates[:candidates.index(stages[i]["name"])], ref)
        doms = [d for d in stages[i]["ns"].domains.split(",") if d in teachers]
        for k, name in enumerate([stages[i - 1]["name"] if i else "start", stages[i]["name"], "teacher"]):
            s = {d: t["score"] for d, t in teachers.items()} if name == "teacher" else scores[name]
            ax.bar([j + 0.27 * (k - 1) for j in range(len(doms))], [s[d] for d in doms], 0.27, label=name)
        ax.set_xticks(range(len(doms)), doms, fontsize=7)
        ax.set_title(f"{stages[i]['name']} against its teachers (held-out)", fontsize=9)
    for ax, i in zip(axes.flat[len(stages) + len(mopds):], controls):   # MOPD against its GRPO control
        ctl = rows[stages[i]["name"]]["control"]
        for d, color in zip(ctl["domains"], "bgrcmyk"):
            for method, style in (("mopd", "-"), ("grpo", "--")):
                ax.plot(*zip(*ctl[method][d]), style, color=color, marker="o", ms=2, lw=1, label=f"{d} {method}")
            ax.axhline(0.9 * ctl["teacher"][d], color=color, lw=0.5, ls=":")
        ax.set_title(f"{stages[i]['name']} vs GRPO (held-out; dotted: 90% of teacher)", fontsize=8)
        ax.set_xlabel("updates", fontsize=7)
    for ax in axes.flat[:n]:
        ax.legend(fontsize=5)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(run, "curves.png"))
    plt.close(fig)
    return ["![training curves, and MOPD against its teachers](curves.png)"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run a cascade recipe end to end (see the module docstring).")
    ap.add_argument("--recipe", default="recipes/tiny.toml", help="the TOML recipe to run")
    ap.add_argument("--run_dir", help="output directory (default: runs/<recipe name>)")
    ap.add_argument("--steps_scale", type=pos_float, default=1.0,
                    help="multiply every stage's --steps and --rm_steps by this (floor 1): quick tests. "
                    "An SFT stage that derives its steps from --epochs (--steps 0) is not scaled")
    ap.add_argument("--eval_limit", type=pos_int, help="eval prompts per domain (overrides the recipe's)")
    ap.add_argument("--only_eval", metavar="CKPT", help="evaluate one checkpoint, print its row, exit")
    a = ap.parse_args(argv)
    recipe = load_recipe(a.recipe, a.steps_scale)  # all of it checked before anything runs
    run = os.path.abspath(a.run_dir or os.path.join("runs", recipe["name"]))
    dd = init_distributed(recipe["device"])
    with run_lock(run):
        if is_main():
            remove_stale_temporaries(run)
        barrier()
        data_dir = prepare_data(recipe, run)
        settings = eval_settings(recipe, data_dir, a.eval_limit)
        if a.only_eval:  # chat's win rate needs the run's reference row (eval.json) to compare with
            rows = {**cached_rows(run, settings), "eval": evaluate(a.only_eval, data_dir, settings, dd)}
            row = table(rows, ["eval"], reference(recipe))["eval"]
            print0(" | ".join(f"{k} {v:.3f}" for k, v in row.items()))
            return row
        data.check_run(recipe, data_dir, settings["domains"])  # every file every stage will read, checked now
        return run_cascade(recipe, run, settings, data_dir, start_checkpoint(recipe, run, data_dir), dd)


if __name__ == "__main__":
    shared_cores = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ and shared_cores:
        # processes that share the cores: OpenMP's spinning threads would slow every op down many
        # times. One process keeps torch's default, a thread per core (bench/RESULTS.md: SFT's speed)
        torch.set_num_threads(1)
    main()
    close_distributed()
