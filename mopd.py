"""
MOPD: multi-domain on-policy distillation. Mid-cascade, pull every domain back to the best
checkpoint seen so far for that domain, with one student trained on a mix of domains at once.

What the paper does (docs/paper.md, MOPD): every domain has a teacher, the earlier checkpoint of the same
cascade that scored best on that domain's validation set. The student samples responses to prompts
of all domains; for every sampled token the domain's teacher scores the same token, and the
per-token advantage is

    a_t = log pi_teacher(y_t | s_t) - log pi_train(y_t | s_t)        (stop-gradient)

used in a REINFORCE surrogate, a token mean per response (1/|V(y)|: every response weighs the
same, whatever its domain's answer length). The advantage's expectation under the student is minus
the reverse KL KL(student || teacher) at that state, so the student moves toward the teacher exactly
where it actually goes (on-policy), a dense per-token signal instead of one reward per response.
Tokens whose train/inference probability ratio r_t = pi_train / pi_inf leaves [0.5, 2] are dropped
(not clipped): where the two engines disagree that much the sample says little about pi_train. Settings:
small groups (4 rollouts a prompt), one update per batch, constant LR after a short warmup, no
weight decay, grad clip 1.0, MoE router frozen and its aux loss off (the teachers share the
student's architecture, and re-learning routing would fight the distillation).

What we keep: all of that (rollouts, batching, the training forward, resume: rl.py's). Logged per
domain: the reverse-KL estimate (minus the mean advantage) and, as a side metric never trained on, the
verifiers' mean reward; with --eval_every, the held-out scores of the student (eval/<domain>) and,
in the first step's row, of each domain's teacher (teacher_eval/<domain>).

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

import os
import time

import torch

import common
import data
import rl
import verifiers
from common import print0
from rollout import Engine


# ---- the math --------------------------------------------------------------------------------
@torch.no_grad()
def mopd_advantages(teacher_logprobs, student_logprobs, mask):
    """a_t = sg(log pi_teacher(y_t|s_t) - log pi_train(y_t|s_t)) on the masked tokens, 0 elsewhere."""
    return (teacher_logprobs - student_logprobs) * mask  # docs/paper.md, MOPD: a_t


@torch.no_grad()
def mismatch_weights(train_logprobs, inference_logprobs, low=0.5, high=2.0):
    """w_t = sg(r_t) * 1[low <= r_t <= high], r_t = pi_train / pi_inf: outside tokens are dropped."""
    r = torch.exp(train_logprobs - inference_logprobs)  # docs/paper.md, MOPD: r_t
    return torch.where((r >= low) & (r <= high), r, 0.0)  # docs/paper.md, MOPD: w_t


def mopd_loss(train_logprobs, teacher_logprobs, inference_logprobs, mask, low, high, num_responses=None):
    """L = -(1/N) sum_y (1/|V(y)|) sum_t w_t sg(a_t) log pi_train(y_t|s_t)   (docs/paper.md, MOPD: L):

    each response's token mean (the paper's 1/|V(y)|), averaged over the N responses of the global
    batch (num_responses, all-reduced by the caller; default this batch's rows): every response
    weighs the same, however long. GRPO's batch token mean would weigh a domain by its answers'
    length, and MOPD mixes domains of very different lengths (structured output's answers ~12
    tokens, chat's ~43). |V(y)| counts every response token, those the mismatch window drops
    (w_t = 0) too.
    Returns (loss, advantages_B_T, weights_B_T)."""
    mask = mask.to(train_logprobs.dtype)
    if num_responses is None:
        num_responses = mask.shape[0]
    adv_B_T = mopd_advantages(teacher_logprobs, train_logprobs, mask)
    w_B_T = mismatch_weights(train_logprobs, inference_logprobs, low, high) * mask
    per_response_B = (w_B_T * adv_B_T * train_logprobs).sum(1) / mask.sum(1).clamp(min=1)
    loss = -per_response_B.sum() / num_responses
    return loss, adv_B_T, w_B_T


# ---- the teachers ----------------------------------------------------------------------------
def load_teachers(spec, domains, tok_path, device):
    """'math=DIR,if=DIR' -> {domain: frozen model}, for the domains of --domains. A directory named for
    several domains is loaded once. Teachers must share the student's tokenizer: a token id has to
    mean the same thing (and be inside the teacher's vocabulary)."""
    paths = {}   # domain -> its teacher's directory
    for item in filter(None, (s.strip() for s in spec.split(","))):
        domain, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--teachers: '{item}' is not DOMAIN=DIR")
        if domain in paths:
            raise ValueError(f"--teachers: two teachers for domain '{domain}'")
        paths[domain] = os.path.abspath(path)
    missing = [d for d in domains if d not in paths]
    if missing:
        raise ValueError(f"--teachers has no teacher for domain(s) {missing} (give DOMAIN=DIR for each)")
    paths = {d: path for d, path in paths.items() if d in domains}   # (a domain not drawn from: not loaded)
    models = {}
    for domain, path in paths.items():
        if not common.checkpoint_exists(path):
            raise ValueError(f"--teachers {domain}={path}: no checkpoint there")
        if path not in models:
            with open(os.path.join(path, "tokenizer.json")) as f, open(tok_path) as g:
                if f.read() != g.read():
                    raise ValueError(f"--teachers: {path}/tokenizer.json differs from the student's {tok_path}")
            # bf16 weights on the GPU halve a teacher's memory; it only ever runs forward
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            models[path] = common.load_checkpoint(path, device, dtype)[0].eval().requires_grad_(False)
            if models[path].config.vocab_size < data.load_tokenizer(tok_path).get_vocab_size():
                raise ValueError(f"--teachers {domain}={path}: vocab_size {models[path].config.vocab_size} "
                                 f"is smaller than the tokenizer's")
    print0(f"MOPD: {len(models)} distinct teacher checkpoint(s) for {len(domains)} domain(s)")
    return {d: models[path] for d, path in paths.items()}


# ---- the update and the loop -----------------------------------------------------------------
def update(run, args, samples, domains_N, teachers):
    """One optimizer step on a rollout batch: every sampled token's advantage from its domain's
    teacher, weighted by the mismatch window (docs/paper.md, MOPD). Micro-batches hold one domain
    each, so that one teacher scores each. -> (the step's Tally, the gradient norm or None)."""
    batches, num_tokens = rl.micro_batches(run, samples, range(len(samples)), args.micro_batch, domains_N)
    num_responses = common.global_sums(dict(n=len(samples)), run.dist.device)["n"]   # every rank's
    tally = rl.Tally(samples, "advantage", "dropped")
    run.optimizer.zero_grad(set_to_none=True)
    for b in batches:
        with torch.no_grad(), run.autocast():   # the teacher scores the student's own tokens
            teacher_B_T = rl.token_logprobs(teachers[b.domain], b)[0]
        with run.autocast():
            logprobs_B_T, entropy_B_T, _ = rl.token_logprobs(run.model, b)   # aux loss off: router frozen
        loss, adv_B_T, w_B_T = mopd_loss(logprobs_B_T, teacher_B_T, b.inf_logprobs_B_T, b.mask_B_T,
                                         args.mismatch_low, args.mismatch_high, num_responses)
        loss.backward()
        tally.trained(b, logprobs_B_T, entropy_B_T)
        tally.add(b, advantage=adv_B_T, dropped=(w_B_T == 0).float())
    return tally, (rl.optimizer_step(run, args) if num_tokens else None)


def check_window(args):
    """The mismatch window must hold r = 1 (cascade.py checks a recipe's MOPD stages with it too)."""
    if not args.mismatch_low <= 1.0 <= args.mismatch_high:
        raise ValueError(f"--mismatch_low {args.mismatch_low} and --mismatch_high {args.mismatch_high}: "
                         f"the window must hold 1 (pi_train = pi_inf)")


def train(args):
    check_window(args)
    if (summary := common.finished_summary(args.out)) is not None:
        return summary
    run = rl.setup(args, freeze_router=True, resume_keys=("mismatch_low", "mismatch_high"))   # router frozen
    teachers = load_teachers(args.teachers, run.domains, run.tok_path, run.dist.device)
    teacher_eval = {}
    if run.heldout and run.step == 0:   # how close to its teacher does each domain get, and how fast?
        for teacher in {id(t): t for t in teachers.values()}.values():   # each distinct teacher once
            rows = [r for r in run.heldout if teachers[r["domain"]] is teacher]
            engine = Engine(teacher)
            teacher_eval.update(rl.heldout_scores(engine, run.tok, rows, args, run.dist) if rows else {})
            engine.release()
        print0("teacher held-out scores:", teacher_eval)
    sampling, t_start = dict(temperature=1.0, max_new_tokens=args.max_new_tokens), time.time()
    for step in range(run.step, args.steps):
        rl.set_lr(run, args, step)
        # 1. rollout: G responses to each of the step's prompts, from the student at temperature 1
        rows_N, samples, texts, rollout_s = rl.rollout(run, args, step, sampling)
        domains_N = [r["domain"] for r in rows_N]
        # 2. the update: the teachers score the student's tokens (no reward is trained on)
        t0 = time.time()
        tally, grad_norm = update(run, args, samples, domains_N, teachers)
        train_s = time.time() - t0
        # 3. the log; the verifiers' rewards are a side metric, to rise toward the teachers'
        rewards_N = verifiers.score_many(domains_N, texts, [r["meta"] for r in rows_N])
        row, g = rl.step_row(run, step, samples, domains_N, tally, dict(reward=rewards_N), grad_norm,
                             rollout_s=rollout_s, train_s=train_s)
        # E_student[a_t] = -KL(student || teacher): minus the mean advantage estimates it
        row.update({f"reverse_kl/{d}": -g[f"{d}/advantage"] / g[f"{d}/tokens"]
                    for d in run.domains if g[f"{d}/tokens"]})
        row["dropped_frac"] = g["dropped"] / max(g["tokens"], 1)
        if step == 0:
            row.update({f"teacher_eval/{d}": s for d, s in teacher_eval.items()})
        rl.end_step(run, args, row, t_start)
    return rl.finish(run, args)


def build_parser():
    p = rl.rl_parser(__doc__, lr=2e-6, group_size=4)
    a = p.add_argument
    a("--teachers", required=True, help="one teacher checkpoint per domain: math=DIR,if=DIR,...")
    a("--mismatch_low", type=common.nonneg_float, default=0.5, help="drop tokens with pi_train/pi_inf below")
    a("--mismatch_high", type=common.pos_float, default=2.0, help="drop tokens with pi_train/pi_inf above")
    return p


def main(argv=None):
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
