"""
Every data file a cascade will read, checked before its first stage runs.

Each stage reads its files when it starts, and load_jsonl stops at the first bad line with its
path:line. That is hours too late when the bad line is in the RL prompts of stage 3 and stage 1 is an
SFT run on a real model. So cascade.py calls `check_run` first; it lists what each stage and the
evaluation will read (the same paths the stages compute from their arguments), loads each file
once with the stages' own checks (JSON, record shape, each verifier's meta), checks the tokenizer
against the model's vocab_size, and reports every problem found, each with its file, before anything
trains.
"""

import json
import os

from data.chat import SPECIAL_TOKENS
from data.jsonl import load_jsonl
from data.tokenizer import load_tokenizer


def stage_files(st, data_dir):
    """[(path, kind, domain or None)] that one recipe stage reads (st["ns"]: its parsed arguments)."""
    ns, script = st["ns"], st["script"]
    if script == "sft":
        return [(ns.sft_file or os.path.join(data_dir, "sft.jsonl"), "sft", None)]
    domains = ns.domains.split(",")
    files = [(ns.prompts, "rl", None)] if getattr(ns, "prompts", None) else \
        [(os.path.join(data_dir, "rl", f"{d}.jsonl"), "rl", d) for d in domains]
    if script == "mopd" and ns.eval_every:
        files += [(os.path.join(data_dir, "eval", f"{d}.jsonl"), "rl", d) for d in domains]
    if script == "rlhf":
        files += [(os.path.join(data_dir, "prefs", f"{s}.jsonl"), "prefs", None) for s in ("train", "eval")]
        files += [(os.path.join(data_dir, "eval", "chat.jsonl"), "rl", "chat")]
    return files


def check_tokenizer(tok_path, config_path):
    """Raise ValueError unless the tokenizer loads for the chat template and every id it can produce
    fits the model's vocab_size; a token past the end is named."""
    tok = load_tokenizer(tok_path)
    with open(config_path) as f:
        vocab_size = json.load(f)["vocab_size"]
    too_big = [f"{t} (id {tok.token_to_id(t)})" for t in SPECIAL_TOKENS
               if tok.token_to_id(t) is not None and tok.token_to_id(t) >= vocab_size]
    if tok.get_vocab_size() > vocab_size:
        added = " (<|pad|> is added when the file lacks it)" if "<|pad|>" in " ".join(too_big) else ""
        raise ValueError(f"{tok_path}: {tok.get_vocab_size()} tokens, more than the model's vocab_size "
                         f"{vocab_size} ({config_path}); past the end: {', '.join(too_big) or 'ordinary tokens'}"
                         f"{added}. Use a model with vocab_size >= {tok.get_vocab_size()}")


def check_run(recipe, data_dir, eval_domains):
    """Check everything a recipe's run will read; raise one ValueError listing every problem."""
    start = recipe.get("init")
    config = os.path.join(start, "config.json") if start else recipe["model"]
    reads = {}  # path -> (kind, domain, who reads it): each file loaded once
    for st in recipe["stage"]:
        for path, kind, domain in stage_files(st, data_dir):
            reads.setdefault(path, (kind, domain, []))[2].append(f"stage '{st['name']}'")
    for d in eval_domains:
        reads.setdefault(os.path.join(data_dir, "eval", f"{d}.jsonl"), ("rl", d, []))[2].append("evaluation")
    problems = []
    try:
        check_tokenizer(os.path.join(start or data_dir, "tokenizer.json"), config)
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e))
    for path, (kind, domain, who) in reads.items():
        if not os.path.isfile(path):
            problems.append(f"{path}: no such file ({', '.join(who)} reads it)")
            continue
        try:
            rows = load_jsonl(path, kind, domain)
        except ValueError as e:
            problems.append(f"{e} ({', '.join(who)} reads it)")
            continue
        for st in recipe["stage"]:   # a mixed-domain --prompts file must hold every domain
            if st["script"] != "sft" and getattr(st["ns"], "prompts", None) == path:
                missing = set(st["ns"].domains.split(",")) - {r["domain"] for r in rows}
                if missing:
                    problems.append(f"{path}: no prompts of domain {sorted(missing)} (stage '{st['name']}')")
    if problems:
        raise ValueError("the data of this run has problems, found before any stage ran:\n  " + "\n  ".join(problems))
