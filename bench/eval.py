"""Where the held-out evaluation's time goes: one checkpoint, every domain, one row per column.

    python bench/eval.py --ckpt runs/tiny/stages/sft/final --data runs/tiny/data --limit 300
    python bench/eval.py ... --max_new_tokens 64 --samples 4     # a shorter cap; 4 samples at T=1

For each column (math twice: with and without thinking) it prints the prompts, the greedy
generation's wall time, the response tokens it generated and how many of the responses hit the
token cap (a response that never stops costs the whole cap), the scoring time, and the mean score
with its standard error. This is what cascade.py runs after every stage, column by column
(rl.evaluate), so the sum of the rows is one row of the report's eval time.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import data  # noqa: E402
import rl  # noqa: E402
import verifiers  # noqa: E402
from report import mean_se  # noqa: E402
from rollout import Engine  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help="data directory (eval/<domain>.jsonl)")
    p.add_argument("--limit", type=int, default=300, help="prompts per domain")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--samples", type=int, default=0, help="also k samples at temperature 1 per prompt")
    p.add_argument("--domains", default=",".join(data.DOMAINS))
    args = p.parse_args()
    torch.set_num_threads(1)   # as cascade.py runs on a CPU
    dd = common.init_distributed("cpu")
    tok, engine = data.load_tokenizer(args.ckpt), Engine(common.load_checkpoint(args.ckpt)[0])
    print(f"{'column':<14}{'prompts':>8}{'gen s':>8}{'tokens':>8}{'capped':>8}{'tok/s':>8}{'score s':>8}"
          f"{'score':>14}")
    total = 0.0
    for domain in args.domains.split(","):
        rows = data.load_jsonl(os.path.join(args.data, "eval", f"{domain}.jsonl"), "rl", domain)[:args.limit]
        for column, thinking in ([("math", True), ("math_nothink", False)] if domain == "math" else [(domain, False)]):
            batch = [dict(r, thinking=thinking) for r in rows]
            for k, temperature in [(1, 0.0)] + ([(args.samples, 1.0)] if args.samples else []):
                t0 = time.time()
                samples, texts = rl.sample_groups(engine, tok, batch, k, dict(
                    temperature=temperature, max_new_tokens=args.max_new_tokens), seed=0)
                gen_s, t1 = time.time() - t0, time.time()
                scores = verifiers.score_many([r["domain"] for r in batch for _ in range(k)], texts,
                                              [r["meta"] for r in batch for _ in range(k)])
                score_s = time.time() - t1
                per_prompt = [sum(scores[i * k:(i + 1) * k]) / k for i in range(len(batch))]
                m, se = mean_se(per_prompt)
                tokens = sum(len(s.token_ids) for s in samples)
                capped = sum(s.finish_reason == "length" for s in samples)
                name = column if k == 1 else f"{column}@T1x{k}"
                print(f"{name:<14}{len(batch):>8}{gen_s:>8.1f}{tokens:>8}{capped:>8}{tokens / gen_s:>8.0f}"
                      f"{score_s:>8.1f}{m:>8.3f} ± {se:.3f}")
                total += gen_s + score_s
    print(f"total {total:.1f} s")
    del dd


if __name__ == "__main__":
    main()
