"""
RLHF: learn a reward model from preference pairs, then run GRPO's objective against it.

What the paper does (docs/paper.md): a reward model scores responses to open-ended prompts (the paper
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
phase is GRPO's objective (rl.group_advantages; strictly on-policy, so J is REINFORCE) with the
reward model's score in place of a verifier; group normalization makes the score's offset and scale
irrelevant (r and 5r + 3 give the same advantages), so only the spacing of the scores inside a group
matters. Every response trains, a truncated one too: judging a cut-off answer is the reward model's
job (GRPO's verifier stages mask them instead). The KL penalty (rl.k3) is off by default;
`--kl_coef 0.03` turns on the paper's.

Run: python rlhf.py --init runs/mopd/final --data runs/data --out runs/rlhf --rm_steps 200 --steps 30
"""

import os
import random
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import common
import data
import rl
from common import print0
from data import chat
from rollout import Engine
from verifiers.chat import wins as chat_wins


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigma(r_chosen - r_rejected), averaged over pairs (docs/paper.md, RLHF: BT)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# ---- the reward model ------------------------------------------------------------------------
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
        batch = random.Random(f"rm-{args.seed}-{step}").sample(train, min(args.rm_batch, len(train)))
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
            g = common.global_sums(dict(loss=local_loss.item() * len(mine), right=(rc > rr).sum().item(), n=len(mine)),
                              d.device)
            loss, acc = g["loss"] / g["n"], g["right"] / g["n"]   # over the global batch
            logger.log(dict(rm_step=step, rm_loss=loss, rm_batch_acc=acc, rm_grad_norm=grad_norm))
            print0(f"rm step {step} | loss {loss:.4f} | batch acc {acc:.3f}")
    stats = dict(rm_train_acc=pair_accuracy(rm, train[:512], pad_id, d.device),
                 rm_eval_acc=pair_accuracy(rm, held_out, pad_id, d.device))
    logger.log(stats)
    print0(f"reward model: train pair accuracy {stats['rm_train_acc']:.3f}, held-out {stats['rm_eval_acc']:.3f}")
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
            shutil.copyfile(tok_path, os.path.join(tmp, "tokenizer.json"))
            common.write_json(os.path.join(tmp, "rm_stats.json"), stats)
    common.barrier()


# ---- rL against the reward model -------------------------------------------------------------
def update(run, args, samples, advantages_N, keep, ref):
    """One optimizer step on the kept samples: REINFORCE with A_i as a token-level mean over the
    global batch (the GRPO objective, strictly on-policy: pi_old = pi, the ratio is 1), plus
    --kl_coef times the k3 penalty toward `ref` (None: off). -> (Tally, gradient norm or None)."""
    batches, num_tokens = rl.micro_batches(run, samples, keep, args.micro_batch)
    tally = rl.Tally(samples, "kl")
    run.optimizer.zero_grad(set_to_none=True)
    for b in batches:
        with run.autocast():
            logprobs_B_T, entropy_B_T, aux = rl.token_logprobs(run.model, b)
        loss = -(advantages_N[b.index, None] * logprobs_B_T * b.mask_B_T).sum() / num_tokens
        if ref is not None:
            with torch.no_grad(), run.autocast():
                ref_B_T = rl.token_logprobs(ref, b)[0]
            kl_B_T = rl.k3(logprobs_B_T, ref_B_T)   # its gradient: that of KL(ref || pi), see rl.k3
            loss = loss + args.kl_coef * (kl_B_T * b.mask_B_T).sum() / num_tokens
            tally.add(b, kl=kl_B_T)
        # load balancing as in SFT, weighted by this batch's share
        loss = loss + run.model.config.router_aux_loss_coef * aux * b.mask_B_T.sum() / num_tokens
        loss.backward()
        tally.trained(b, logprobs_B_T, entropy_B_T)
    return tally, (rl.optimizer_step(run, args) if num_tokens else None)


def train_policy(args, rm):
    """RL against the reward model: GRPO's loop with the reward model's score as the reward."""
    if (summary := common.finished_summary(args.out)) is not None:
        return summary
    run = rl.setup(args)
    ref = None
    if args.kl_coef > 0:   # the KL reference: the stage's frozen starting checkpoint
        ref = common.load_checkpoint(args.init, run.dist.device)[0].eval().requires_grad_(False)
    sampling = dict(temperature=1.0, max_new_tokens=args.max_new_tokens)
    G, t_start = args.group_size, time.time()
    for step in range(run.step, args.steps):
        rl.set_lr(run, args, step)
        # 1. rollout: G responses to each of the step's chat prompts
        rows_N, samples, texts, rollout_s = rl.rollout(run, args, step, sampling)
        # 2. reward: the reward model's score of each final answer (never the hidden judge's)
        seqs = [rm_ids(run.tok, r["messages"], chat.parse_response(t)["answer"]) for r, t in zip(rows_N, texts)]
        rewards_N = rm_scores(rm, seqs, run.pad_id, run.dist.device).double().cpu()
        # 3. advantage: A_i, group-normalized (docs/paper.md, GRPO); groups of equal scores drop out
        advantages_N = rl.group_advantages(rewards_N, G).float().to(run.dist.device)
        signal_N = rl.has_signal(rewards_N, G)
        # 4. the update
        t0 = time.time()
        tally, grad_norm = update(run, args, samples, advantages_N, signal_N.nonzero().squeeze(1).tolist(), ref)
        train_s = time.time() - t0
        # 5. the log
        row, g = rl.step_row(run, step, samples, [r["domain"] for r in rows_N], tally,
                             dict(reward=rewards_N, filtered=~signal_N), grad_norm,
                             rollout_s=rollout_s, train_s=train_s)
        row["filtered_frac"] = g["filtered"] / max(g["samples"], 1)
        if ref is not None:
            row["kl_ref"] = g["kl"] / max(g["tokens"], 1)
        rl.end_step(run, args, row, t_start)
    return rl.finish(run, args)


# ---- the judge's verdict: win rate against the starting checkpoint ---------------------------
def judge_win_rate(args, tok, d, final_path):
    """Greedy answers of --init and of the final policy to the first --eval_prompts held-out chat
    prompts (in thinking mode unless --thinking off), each judged by the hidden judge (the chat
    domain's verifier); a win counts 1, a tie 1/2."""
    rows = rl.load_prompts(args.data, ["chat"], split="eval")["chat"][:args.eval_prompts]
    rows = [dict(r, thinking=args.thinking != "off") for r in rows]
    scores = [rl.evaluate(Engine(common.load_checkpoint(path, d.device)[0]), tok, rows, args.max_new_tokens, d)
              for path in (args.init, final_path)]
    n = max(len(rows), 1)
    return dict(judge_win_rate=sum(chat_wins(scores[1], scores[0])) / n,   # the final policy's against --init's
                judge_init=sum(scores[0]) / n, judge_final=sum(scores[1]) / n)


# ---- main ------------------------------------------------------------------------------------
def build_parser():
    p = rl.rl_parser(__doc__, lr=1e-6, group_size=8, min_group=2)
    p.set_defaults(domains="chat")
    a = p.add_argument
    a("--kl_coef", type=common.nonneg_float, default=0.0,
      help="k3 KL penalty toward --init (0: none; the paper's RLHF reportedly uses 0.03)")
    a("--rm_steps", type=common.pos_int, default=100, help="reward-model training steps")
    a("--rm_lr", type=common.pos_float, default=1e-4, help="reward-model learning rate")
    a("--rm_batch", type=common.pos_int, default=32, help="preference pairs per reward-model step")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    summary = common.finished_summary(args.out)
    if summary is not None and "judge_win_rate" in summary:   # done, judge's verdict included
        return summary
    d = common.init_distributed(args.device)
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
    rm = RewardModel(common.load_checkpoint(rm_path, d.device)[0]).to(d.device)
    rm.head.load_state_dict(common.read_tensors(os.path.join(rm_path, "score_head.safetensors"), d.device))
    rm_stats = common.read_json(os.path.join(rm_path, "rm_stats.json"))
    summary = dict(train_policy(args, rm.eval().requires_grad_(False)), **rm_stats)
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
