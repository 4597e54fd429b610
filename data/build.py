"""
Build a dataset directory: the tokenizer and every JSONL file the cascade reads.

    python -m data.build --out runs/data --seed 0 --preset tiny

writes
    tokenizer.json          byte-level BPE trained on the rendered SFT conversations and RL prompts
    sft.jsonl               SFT conversations of all nine domains, half in thinking mode, shuffled
    rl/<domain>.jsonl       RL prompts with their verifier meta (half SFT level, half harder)
    eval/<domain>.jsonl     held-out prompts: no task in them appears in any training file
    prefs/train.jsonl       chat preference pairs for the reward model (chosen > rejected by the judge)
    prefs/eval.jsonl        pairs on the eval chat prompts
    build.json              the arguments, written first

Everything is a deterministic function of the arguments. Each file is written atomically (temp
file + rename), so one that exists is complete; running again skips what exists, and refuses to mix
files of different arguments in one directory (build.json must match).
"""

import argparse
import json
import os
import random
import time

from data.chat import SPECIAL_TOKENS, render
from data.domains import DOMAINS, generate, preference_pair, prompt_record, sft_record
from data.jsonl import write_jsonl
from data.tokenizer import save_tokenizer, train_tokenizer

PRESETS = {  # sizes: sft = conversations in total, rl / eval = prompts per domain, prefs = pairs
    "tiny": dict(sizes=dict(sft=3600, rl=1000, eval=400, prefs=400), vocab_size=2048, doc_lines=24),
    "small": dict(sizes=dict(sft=36000, rl=3000, eval=400, prefs=4000), vocab_size=8192, doc_lines=64),
}
# (the synthetic text has few distinct words: BPE runs out of merges near 3.5K ids, so "small" gets a
# vocabulary below 8192; what matters is that it fits the model's vocab_size)
RL_DIFFICULTY = EVAL_DIFFICULTY = 0.5  # fraction of hard tasks: RL needs some it cannot solve yet


def check_build_args(sizes, vocab_size, doc_lines):
    """build's arguments, checked (cascade.py checks a recipe's [build] with it before anything runs)."""
    unknown = set(sizes) - set(PRESETS["tiny"]["sizes"])
    if unknown:
        raise ValueError(f"build: unknown sizes {sorted(unknown)}; expected {sorted(PRESETS['tiny']['sizes'])}")
    for key, n in sizes.items():   # (no SFT conversations or preference pairs: a recipe without them)
        if n < (1 if key in ("rl", "eval") else 0):
            raise ValueError(f"build: sizes.{key} = {n}: must be >= {1 if key in ('rl', 'eval') else 0}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"build: vocab_size = {vocab_size}: must be >= {256 + len(SPECIAL_TOKENS)} "
                         "(the 256 bytes and the chat template's special tokens)")
    if not 1 <= doc_lines <= 990:   # a hard document has 2 * doc_lines keys, of 1980 distinct ones
        raise ValueError(f"build: doc_lines = {doc_lines}: must be in 1..990")


def build(out_dir, seed=0, sizes=None, vocab_size=2048, doc_lines=24):
    """Write the dataset (module docstring) to out_dir; returns out_dir. Idempotent."""
    check_build_args(sizes or {}, vocab_size, doc_lines)
    sizes = {**PRESETS["tiny"]["sizes"], **(sizes or {})}
    args = {"seed": seed, "sizes": sizes, "vocab_size": vocab_size, "doc_lines": doc_lines}
    files = ["tokenizer.json", "sft.jsonl", "prefs/train.jsonl", "prefs/eval.jsonl"] + \
        [f"{split}/{d}.jsonl" for split in ("rl", "eval") for d in DOMAINS]
    manifest = os.path.join(out_dir, "build.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            try:
                found = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}: not JSON ({e}); delete the directory to build it afresh") from None
        if found != args:
            raise ValueError(f"{manifest}: {out_dir} was built with {found}, not {args}; "
                             f"use another directory")
        if all(os.path.exists(os.path.join(out_dir, p)) for p in files):
            return out_dir
    else:
        os.makedirs(out_dir, exist_ok=True)
        write_json(manifest, args)

    data = make_data(seed, sizes, doc_lines)
    for path, records in data.items():
        if not os.path.exists(os.path.join(out_dir, path)):
            write_jsonl(os.path.join(out_dir, path), records)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        texts = [text for rec in data["sft.jsonl"] + [r for d in DOMAINS for r in data[f"rl/{d}.jsonl"]]
                 for text, _ in render(rec["messages"], rec.get("tools"))]
        print(f"build: training the tokenizer ({vocab_size} tokens)", flush=True)
        save_tokenizer(train_tokenizer(texts, vocab_size), tok_path)
    return out_dir


def make_data(seed, sizes, doc_lines):
    """All the records, in memory: {relative path: list of records}."""
    data, sft = {}, []
    rng = random.Random(f"{seed}:build")
    t0 = time.time()
    for i, d in enumerate(DOMAINS):
        if i:  # one line per domain (a piped log stays readable); the ETA assumes domains cost alike
            spent = time.time() - t0
            print(f"build: {i}/{len(DOMAINS)} domains, {spent:.0f}s, eta {spent / i * (len(DOMAINS) - i):.0f}s",
                  flush=True)
        n_sft = sizes["sft"] // len(DOMAINS) + (i < sizes["sft"] % len(DOMAINS))
        sft += [sft_record(d, it, thinking=rng.random() < 0.5)
                for it in generate(d, "sft", n_sft, seed, 0.0, doc_lines)]
        data[f"rl/{d}.jsonl"] = [prompt_record(d, it) for it in
                                 generate(d, "rl", sizes["rl"], seed, RL_DIFFICULTY, doc_lines)]
        data[f"eval/{d}.jsonl"] = [prompt_record(d, it) for it in
                                   generate(d, "eval", sizes["eval"], seed, EVAL_DIFFICULTY, doc_lines)]
    rng.shuffle(sft)
    data["sft.jsonl"] = sft
    for name, items in [("train", generate("chat", "prefs", sizes["prefs"], seed)),
                        ("eval", generate("chat", "eval", sizes["eval"], seed, EVAL_DIFFICULTY))]:
        pairs = []
        for it in items:
            chosen, rejected = preference_pair(rng, it)
            pairs.append({"messages": [{"role": "user", "content": it["prompt"]}],
                          "chosen": chosen, "rejected": rejected})
        data[f"prefs/{name}.jsonl"] = pairs
    return data


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"  # per process: ranks building the same directory never clash
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the synthetic datasets and the tokenizer.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="tiny: ~3.6K SFT conversations, vocab 2048; small: ~36K, vocab 8192")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    t0 = time.time()
    build(a.out, a.seed, preset["sizes"], preset["vocab_size"] if a.vocab_size is None else a.vocab_size,
          preset["doc_lines"])
    print(f"built {a.out} ({a.preset}, seed {a.seed}) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
