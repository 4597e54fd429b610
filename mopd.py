"""
MOPD: multi-domain on-policy distillation. Mid-cascade, pull every domain back to the best
checkpoint seen so far for that domain, with one student trained on a mix of domains at once.

What the paper does (RECIPE.md): every domain has a teacher, the earlier checkpoint of the same
cascade that scored best on that domain's validation set. The student samples responses to prompts
of all domains; for every sampled token the domain's teacher scores the same token, and the
per-token advantage is

    a_t = log pi_teacher(y_t | s_t) - log pi_train(y_t | s_t)        (stop-gradient)

used in a REINFORCE surrogate. Its expectation under the student is minus the reverse KL
KL(student || teacher) at that state, so the student moves toward the teacher exactly where it
actually goes (on-policy), a dense per-token signal instead of one reward per response. Tokens
whose train/inference probability ratio r_t = pi_train / pi_inf leaves [0.5, 2] are dropped (not
clipped): where the two engines disagree that much the sample says little about pi_train. Settings:
small groups (4 rollouts a prompt), one update per batch, constant LR after a short warmup, no
weight decay, grad clip 1.0, MoE router frozen and its aux loss off (the teachers share the
student's architecture, and re-learning routing would fight the distillation).

What we keep: all of that. Rollouts, batching, the training forward, resume and gradient sync are
grpo.py's (one idea, one place); only the advantage and the weights differ. Logged per domain: the
reverse-KL estimate (minus the mean advantage) and, as a side metric never trained on, the
verifiers' mean reward; with --eval_every, greedy eval scores as a fraction of each teacher's.

What we change: the paper's teachers run in separate inference servers. Ours live in this process,
which costs memory: each distinct teacher is one full copy of the model (bf16 weights on a GPU,
fp32 on a CPU; eval mode, no grad, no optimizer state), plus the activations of its scoring forward
(one micro-batch at a time; its logits only at the response tokens: tokens x vocab floats). K
distinct teachers cost K models; a checkpoint named for several domains is loaded once. With
--fsdp only the student is sharded: the teachers never train, so they have no gradients or optimizer
state to shard, and each rank holds them whole.

Run: python mopd.py --init runs/mdrl/final --teachers math=runs/sft/final,if=runs/mdrl/final \
        --domains math,if --mix 0.5,0.5 --data runs/data --out runs/mopd
"""

import argparse
import os
import time

import torch

import common
import data
import grpo
import verifiers
from common import print0
from data import chat
from rollout import Engine


# ----------------------------------------------------------------------------------------------
# The math


@torch.no_grad()
def mopd_advantages(teacher_logprobs, student_logprobs, mask):
    """a_t = sg(log pi_teacher(y_t|s_t) - log pi_train(y_t|s_t)) on the masked tokens, 0 elsewhere."""
    return (teacher_logprobs - student_logprobs) * mask  # RECIPE.md MOPD: a_t


@torch.no_grad()
def mismatch_weights(train_logprobs, inference_logprobs, low=0.5, high=2.0):
    """w_t = sg(r_t) * 1[low <= r_t <= high], r_t = pi_train / pi_inf: outside tokens are dropped."""
    r = torch.exp(train_logprobs - inference_logprobs)  # RECIPE.md MOPD: r_t
    return torch.where((r >= low) & (r <= high), r, 0.0)  # RECIPE.md MOPD: w_t


def mopd_loss(train_logprobs, teacher_logprobs, inference_logprobs, mask, low, high, num_tokens=None):
    """L = -(1/|V|) sum_t w_t sg(a_t) log pi_train(y_t|s_t)   (RECIPE.md MOPD: L).

    RECIPE.md writes 1/|V(y)| for one response y; like GRPO we take the token-level mean over the
    whole global batch instead (num_tokens, all-reduced by the caller; default the mask's own
    count), so long responses are not down-weighted. It counts every response token, those the
    mismatch window drops (w_t = 0) too: a batch with more mismatch takes a smaller step.
    Returns (loss, advantages_B_T, weights_B_T)."""
    mask = mask.to(train_logprobs.dtype)
    if num_tokens is None:
        num_tokens = mask.sum()
    adv_B_T = mopd_advantages(teacher_logprobs, train_logprobs, mask)
    w_B_T = mismatch_weights(train_logprobs, inference_logprobs, low, high) * mask
    loss = -(w_B_T * adv_B_T * train_logprobs).sum() / num_tokens
    return loss, adv_B_T, w_B_T


# ----------------------------------------------------------------------------------------------
# Teachers and the MOPD step


def load_teachers(spec, domains, tok_path, device):
    """'math=DIR,if=DIR' -> {domain: frozen model}, for the domains of --domains. A directory named for
    several domains is loaded once. Teachers must share the student's tokenizer: a token id has to
    mean the same thing (and be inside the teacher's vocabulary)."""
    models, teachers, named = {}, {}, set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        domain, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--teachers: '{item}' is not DOMAIN=DIR")
        if domain in named:
            raise ValueError(f"--teachers: two teachers for domain '{domain}'")
        named.add(domain)
        path = os.path.abspath(path)
        if domain not in domains:   # (not loaded: a teacher for a domain not drawn from)
            continue
        if not common.checkpoint_exists(path):
            raise ValueError(f"--teachers {domain}={path}: no checkpoint there")
        if path not in models:
            with open(os.path.join(path, "tokenizer.json")) as f, open(tok_path) as g:
                if f.read() != g.read():
                    raise ValueError(f"--teachers: {path}/tokenizer.json differs from the student's "
                                     f"{tok_path}")
            # bf16 weights on the GPU halve a teacher's memory; it only ever runs forward
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            models[path] = common.load_checkpoint(path, device, dtype)[0].eval().requires_grad_(False)
            if models[path].config.vocab_size < data.load_tokenizer(tok_path).get_vocab_size():
                raise ValueError(f"--teachers {domain}={path}: vocab_size {models[path].config.vocab_size} "
                                 f"is smaller than the tokenizer's")
        teachers[domain] = models[path]
    missing = [d for d in domains if d not in teachers]
    if missing:
        raise ValueError(f"--teachers has no teacher for domain(s) {missing} (give DOMAIN=DIR for each)")
    print0(f"MOPD: {len(models)} distinct teacher checkpoint(s) for {len(domains)} domain(s)")
    return teachers


def mopd_update(run, args, samples, domains_N, teachers):
    """One optimizer step on a rollout batch. Micro-batches hold one domain each, so that each is
    scored by one teacher. Returns local sums for the logs."""
    pad_id = run.tok.token_to_id(chat.PAD)
    mbs = []
    for dom in sorted(set(domains_N)):
        mine = [i for i, x in enumerate(domains_N) if x == dom]
        mbs += [(dom, b) for _, b in grpo.micro_batches([samples[i] for i in mine], args.micro_batch,
                                                  pad_id, run.dist.device)]
    mbs = grpo.same_count(run, mbs, (run.domains[0], grpo.empty_batch(pad_id, run.dist.device)))
    local = sum(b["mask_B_T"].sum().item() for _, b in mbs)
    num_tokens = grpo.global_sums(dict(n=local), run.dist.device)["n"]   # |V| of the global batch
    sums = dict(tokens=local, dropped=0, fwd_tokens=0, entropy=0, mismatch_abs=0, mismatch_k3=0,
                **{f"{dom}/{k}": 0.0 for dom in run.domains for k in ("adv", "tokens")})
    run.optimizer.zero_grad(set_to_none=True)
    for dom, b in mbs:
        mask_B_T, inf_B_T = b["mask_B_T"], b["inf_logprobs_B_T"]
        with torch.no_grad(), run.autocast():
            teacher_B_T = grpo.token_logprobs(teachers[dom], b)[0]
        with run.autocast():
            lp_B_T, ent_B_T, _ = grpo.token_logprobs(run.model, b)   # aux loss off: router frozen
        loss, adv_B_T, w_B_T = mopd_loss(lp_B_T, teacher_B_T, inf_B_T, mask_B_T,
                                         args.mismatch_low, args.mismatch_high, num_tokens)
        loss.backward()
        sums[f"{dom}/adv"] += adv_B_T.sum().item()
        sums[f"{dom}/tokens"] += mask_B_T.sum().item()
        sums["dropped"] += ((w_B_T == 0) & (mask_B_T > 0)).sum().item()
        grpo.token_stats(sums, b, lp_B_T, ent_B_T, pad_id)
    if num_tokens > 0:
        sums["grad_norm"] = grpo.optimizer_step(run, args)
    return sums


@torch.no_grad()
def evaluate(run, args, engine, pools):
    """Greedy mean verifier score of `engine`'s model on the first --eval_prompts of each domain."""
    d = run.dist
    rows = [dict(r, thinking=args.thinking != "off") for rs in pools.values() for r in rs[:args.eval_prompts]]
    rows = rows[d.rank::d.world_size]
    texts = grpo.sample_groups(engine, run.tok, rows, 1, dict(temperature=0.0, max_new_tokens=args.max_new_tokens),
                               args.seed)[1]   # (with no rows too: under FSDP generate is a collective)
    domains = [r["domain"] for r in rows]
    scores = verifiers.score_many(domains, texts, [r["meta"] for r in rows])
    g = grpo.global_sums(grpo.per_domain(run, scores, domains, "score"), d.device)
    return {x: g[f"{x}/score"] / g[f"{x}/n"] for x in pools if g[f"{x}/n"]}


# ----------------------------------------------------------------------------------------------
# The loop


def check_window(args):
    """The mismatch window must hold r = 1 (cascade.py checks a recipe's MOPD stages with it too)."""
    if not args.mismatch_low <= 1.0 <= args.mismatch_high:
        raise ValueError(f"--mismatch_low {args.mismatch_low} and --mismatch_high {args.mismatch_high}: "
                         f"the window must hold 1 (pi_train = pi_inf)")


def train(args):
    check_window(args)
    if (summary := common.finished_summary(args.out)) is not None:
        return summary
    run = grpo.setup(args, freeze_router=True)   # router frozen, aux loss off
    teachers = load_teachers(args.teachers, run.domains, run.tok_path, run.dist.device)
    eval_pools, teacher_eval = None, {}
    if args.eval_every:   # how close to each teacher does the student get, and in how many steps?
        eval_pools = grpo.load_prompts(args.data, run.domains, split="eval")
        for dom in run.domains:
            teacher_eval.update(evaluate(run, args, Engine(teachers[dom]), {dom: eval_pools[dom]}))
        print0("teacher eval scores:", teacher_eval)
    for step in range(run.step, args.steps):
        grpo.set_lr(run, args, step)
        # the verifiers' rewards are never trained on: a side metric, to rise toward the teachers'
        rows_N, samples, _, stats = grpo.rollout_step(run, args, step, dict(
            temperature=1.0, max_new_tokens=args.max_new_tokens))
        t0 = time.time()
        stats.update(mopd_update(run, args, samples, [r["domain"] for r in rows_N], teachers),
                     train_s=time.time() - t0)
        row, g = grpo.step_row(run, step, stats)
        for dom in run.domains:
            if g[f"{dom}/tokens"]:
                # E_student[a_t] = -KL(student || teacher): minus the mean advantage estimates it
                row[f"reverse_kl/{dom}"] = -g[f"{dom}/adv"] / g[f"{dom}/tokens"]
        row["dropped_frac"] = g["dropped"] / max(g["tokens"], 1)
        if eval_pools and (step + 1 == args.steps or (step + 1) % args.eval_every == 0):
            for dom, score in evaluate(run, args, run.engine, eval_pools).items():
                row[f"eval/{dom}"] = score
                if teacher_eval.get(dom):
                    row[f"eval_vs_teacher/{dom}"] = score / teacher_eval[dom]
        grpo.end_step(run, args, row)
    return grpo.finish(run, args)


def build_parser():
    p = grpo.add_rl_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), lr=2e-6, group_size=4)
    p.add_argument("--teachers", required=True, help="one teacher checkpoint per domain: math=DIR,if=DIR,...")
    p.add_argument("--mismatch_low", type=common.nonneg_float, default=0.5,
                   help="drop tokens with pi_train/pi_inf below")
    p.add_argument("--mismatch_high", type=common.pos_float, default=2.0,
                   help="drop tokens with pi_train/pi_inf above")
    p.add_argument("--eval_every", type=common.nonneg_int, default=0,
                   help="greedy eval on DATA/eval (teachers first) every N steps and at the end (0: off)")
    p.add_argument("--eval_prompts", type=common.pos_int, default=64, help="eval prompts per domain")
    return p


def main(argv=None):
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
