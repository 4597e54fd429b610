"""
RLHF: learn a reward model from preference pairs, then run GRPO against it.

What the paper does (RECIPE.md): a reward model scores responses to open-ended prompts (the paper
uses a large generative pairwise reward model) and RL maximizes that score with GRPO-style group
advantages, reportedly with a small KL penalty (0.03) to the starting policy.

What we keep: RL against a learned reward, never against the "human" itself. Our human is the
hidden rule-based judge of the `chat` domain (verifiers.chat.judge); the preference pairs in
DATA/prefs were labelled by it. The reward model only ever sees the pairs; the judge is used once,
at the end, to report the policy's win rate against the starting checkpoint, as a human
evaluation would.

What we change, and why: a generative pairwise judge is far beyond a tiny model. We use the
classic Bradley-Terry reward model: the same transformer (initialized from --init) with a scalar
head on the hidden state of the last token, trained with -log sigma(r_chosen - r_rejected). The RL
phase is grpo.py's loop with the reward model's score in place of a verifier; group normalization
makes the score's offset and scale irrelevant (r and 5r + 3 give the same advantages), so only the
spacing of the scores inside a group matters. The KL
penalty is off by default, as in every other RL stage here; `--kl_coef 0.03` turns on the paper's.

Run: python rlhf.py --init runs/mopd/final --data runs/data --out runs/rlhf --rm_steps 200 --steps 30
"""

import json
import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import common
import data
import grpo
from common import print0
from data import chat
from rollout import Engine
from verifiers.chat import judge, wins as chat_wins


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigma(r_chosen - r_rejected), averaged over pairs (Bradley-Terry, RECIPE.md RLHF)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# ----------------------------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    """The transformer (no LM head used) plus a linear scalar head on the last token's hidden state."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)   # every response starts at reward 0
        nn.init.zeros_(self.head.bias)

    def forward(self, ids_B_T, last_B):
        hidden_B_T_C, _ = self.body(ids_B_T, return_hidden=True)
        return self.head(hidden_B_T_C[torch.arange(len(last_B)), last_B]).squeeze(-1).float()


def rm_ids(tok, messages, answer):
    """What the reward model reads: the prompt (non-thinking template) and the final answer only,
    the same for the preference pairs and for the policy's responses (whose reasoning is dropped)."""
    return (chat.generation_prompt_ids(tok, messages, thinking=False)
            + tok.encode(answer + chat.IM_END, add_special_tokens=False).ids)


def rm_scores(rm, seqs, pad_id, device, batch_size=32):
    """Score token sequences with the reward model, in right-padded batches."""
    out = [torch.zeros(0, device=device)]   # (no sequences: no scores)
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        T = max(map(len, chunk))
        ids_B_T = torch.tensor([s + [pad_id] * (T - len(s)) for s in chunk], device=device)
        out.append(rm(ids_B_T, torch.tensor([len(s) - 1 for s in chunk], device=device)))
    return torch.cat(out)


def pair_ids(tok, pairs):
    """Preference rows -> [(chosen ids, rejected ids)] as the reward model reads them."""
    return [(rm_ids(tok, p["messages"], p["chosen"]), rm_ids(tok, p["messages"], p["rejected"]))
            for p in pairs]


@torch.no_grad()
def pair_accuracy(rm, pairs, pad_id, device):
    """Fraction of pairs where the reward model ranks chosen above rejected."""
    rc, rr = rm_scores(rm, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, device).chunk(2)
    return (rc > rr).float().mean().item()


def train_reward_model(args, tok, d, logger):
    """Bradley-Terry on DATA/prefs/train.jsonl; held-out pair accuracy on prefs/eval.jsonl. AdamW at a
    constant --rm_lr, gradient norm clipped at 1 (--lr, --warmup and --grad_clip are the RL phase's)."""
    fsdp = args.fsdp and d.world_size > 1
    body, _ = common.load_checkpoint(args.init, "cpu" if fsdp else d.device)
    rm = RewardModel(body).to("cpu" if fsdp else d.device)
    if fsdp:
        common.shard(rm, d.device)
    pad_id = tok.token_to_id(chat.PAD)
    train = pair_ids(tok, data.load_jsonl(os.path.join(args.data, "prefs", "train.jsonl"), "prefs"))
    held_out = pair_ids(tok, data.load_jsonl(os.path.join(args.data, "prefs", "eval.jsonl"), "prefs"))
    if min(args.rm_batch, len(train)) < d.world_size:
        raise ValueError(f"--rm_batch {args.rm_batch} (and {len(train)} training pairs) must give every "
                         f"one of the {d.world_size} ranks at least one pair")
    opt = torch.optim.AdamW(rm.parameters(), lr=args.rm_lr, betas=(0.9, 0.98), weight_decay=0.0)
    for step in range(args.rm_steps):
        rng = random.Random(f"rm-{args.seed}-{step}")
        batch = rng.sample(train, min(args.rm_batch, len(train)))
        mine = batch[d.rank::d.world_size]
        seqs = [c for c, _ in mine] + [r for _, r in mine]
        # one forward per rank and step (FSDP needs every rank to run the same number)
        rc, rr = rm_scores(rm, seqs, pad_id, d.device, batch_size=len(seqs)).chunk(2)
        local_loss = bradley_terry_loss(rc, rr)
        opt.zero_grad(set_to_none=True)
        # the mean over the global batch: each rank's share of it, summed over ranks by sync_grads
        (local_loss * len(mine) / len(batch)).backward()
        common.sync_grads(list(rm.parameters()))
        grad_norm = common.clip_grad_norm(rm.parameters(), 1.0, f"{args.out}: reward-model step {step}").item()
        opt.step()
        if step % args.log_every == 0 or step + 1 == args.rm_steps:   # (every rank: a collective)
            g = grpo.global_sums(dict(loss=local_loss.item() * len(mine), right=(rc > rr).sum().item(),
                                      n=len(mine)), d.device)
            loss, acc = g["loss"] / g["n"], g["right"] / g["n"]   # over the global batch
            logger.log(dict(rm_step=step, rm_loss=loss, rm_batch_acc=acc, rm_grad_norm=grad_norm))
            print0(f"rm step {step} | loss {loss:.4f} | batch acc {acc:.3f}")
    stats = dict(rm_train_acc=pair_accuracy(rm, train[:512], pad_id, d.device),
                 rm_eval_acc=pair_accuracy(rm, held_out, pad_id, d.device))
    logger.log(stats)
    print0(f"reward model: train pair accuracy {stats['rm_train_acc']:.3f}, "
           f"held-out {stats['rm_eval_acc']:.3f}")
    return rm, stats


def save_reward_model(path, rm, tok_path, stats):
    """The body as an HF-layout checkpoint, plus score_head.safetensors (every rank calls it)."""
    state = common.full_state_dict(rm)   # gathered from the shards under FSDP
    if common.is_main():
        with common.atomic_dir(path) as tmp:
            part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            rm.body.save_pretrained(tmp, part("body."))
            save_file({k: v.contiguous() for k, v in part("head.").items()},
                      os.path.join(tmp, "score_head.safetensors"))
            with open(tok_path, "rb") as f, open(os.path.join(tmp, "tokenizer.json"), "wb") as g:
                g.write(f.read())
            with open(os.path.join(tmp, "rm_stats.json"), "w") as f:
                json.dump(stats, f)
    common.barrier()


def load_reward_model(path, device):
    body, _ = common.load_checkpoint(path, device)
    rm = RewardModel(body).to(device)
    rm.head.load_state_dict(common.read_tensors(os.path.join(path, "score_head.safetensors"), device))
    return rm, common.read_json(os.path.join(path, "rm_stats.json"))


# ----------------------------------------------------------------------------------------------
# The judge's verdict: win rate against the starting checkpoint


@torch.no_grad()
def judge_win_rate(args, tok, d, final_path):
    """Greedy answers of --init and of the final policy to the eval chat prompts, each judged by the
    hidden judge; a win counts 1, a tie 1/2."""
    rows = grpo.load_prompts(args.data, ["chat"], split="eval")["chat"][:args.eval_prompts]
    rows = [dict(r, thinking=args.thinking != "off") for r in rows][d.rank::d.world_size]
    sampling = dict(temperature=0.0, max_new_tokens=args.max_new_tokens)
    scores = []
    for path in (args.init, final_path):
        model, _ = common.load_checkpoint(path, d.device)
        texts = grpo.sample_groups(Engine(model), tok, rows, 1, sampling, args.seed)[1] if rows else []
        scores.append([judge(t, r["meta"]) for t, r in zip(texts, rows)])
    wins = sum(chat_wins(scores[1], scores[0]))   # the final policy's answers against --init's
    g = grpo.global_sums(dict(wins=wins, n=len(rows), base=sum(scores[0]), final=sum(scores[1])), d.device)
    n = max(g["n"], 1)
    return dict(judge_win_rate=g["wins"] / n, judge_init=g["base"] / n, judge_final=g["final"] / n)


# ----------------------------------------------------------------------------------------------
# main


def build_parser():
    p = grpo.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(domains="chat", mix="", lr=1e-6)
    p.add_argument("--rm_steps", type=common.pos_int, default=100, help="reward-model training steps")
    p.add_argument("--rm_lr", type=common.pos_float, default=1e-4, help="reward-model learning rate")
    p.add_argument("--rm_batch", type=common.pos_int, default=32, help="preference pairs per reward-model step")
    p.add_argument("--eval_prompts", type=common.pos_int, default=64,
                   help="eval chat prompts for the judge's win rate")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    summary = common.finished_summary(args.out)
    if summary is not None and "judge_win_rate" in summary:   # done, judge's verdict included
        return summary
    d = common.init_distributed(args.device)
    common.set_seed(args.seed)
    tok_path = os.path.join(args.init, "tokenizer.json")
    tok = data.load_tokenizer(tok_path)
    metrics, rm_path = os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "reward_model")
    if common.is_main() and not common.checkpoint_exists(rm_path) and os.path.exists(metrics):
        os.remove(metrics)   # a run killed before its reward model was saved: it starts again, log too
    logger = common.MetricsLogger(metrics)
    if not common.checkpoint_exists(rm_path):
        rm, rm_stats = train_reward_model(args, tok, d, logger)
        save_reward_model(rm_path, rm, tok_path, rm_stats)
        del rm
    # scoring reads the saved reward model, a plain module on every rank (also after FSDP training)
    rm, rm_stats = load_reward_model(rm_path, d.device)
    rm.eval().requires_grad_(False)
    pad_id = tok.token_to_id(chat.PAD)

    def reward_fn(rows_N, texts_N):   # the reward model's score of the final answer
        answers = [chat.parse_response(t)["answer"] for t in texts_N]
        seqs = [rm_ids(tok, r["messages"], a) for r, a in zip(rows_N, answers)]
        return rm_scores(rm, seqs, pad_id, d.device).tolist()

    summary = dict(grpo.train(args, reward_fn=reward_fn), **rm_stats)
    del rm
    verdict = judge_win_rate(args, tok, d, os.path.join(args.out, "final"))
    logger.log(verdict)
    print0(" | ".join(f"{k} {v:.3f}" for k, v in verdict.items()))
    summary.update(verdict)
    if common.is_main():   # the summary of OUT/final gains the reward model's and the judge's numbers
        state_file = os.path.join(args.out, "final", "trainer_state.json")
        common.write_json(state_file, dict(common.read_json(state_file), summary=summary))
    return summary


if __name__ == "__main__":
    main()
