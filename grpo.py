"""
GRPO: the one policy-gradient stage behind every verifiable Cascade RL stage (IF-RL, multi-domain
RL, long-context RL, code RL, SWE RL); a stage is this file with its own prompt mix.

What the paper does (docs/paper.md, GRPO): sample G responses per prompt from the current policy,
score them with a verifier, give every token of response i the advantage A_i = (r_i - mean(r)) /
std(r) of its group, and maximize the PPO surrogate J averaged over all response tokens of the batch
(a token-level mean: long responses are not down-weighted). Strictly on-policy, one optimizer step
per rollout batch: the ratio is 1, the update is REINFORCE with group-normalized rewards. No KL.
Groups with all-equal rewards carry no signal and are dropped (DAPO's dynamic filtering).

What we keep: all of it. pi_old is the trainer's own logprob before the batch's first optimizer
step, so with one step per batch the ratio is exactly 1 and the update is REINFORCE; the PPO clip
(DAPO's clip-higher) binds only with --epochs > 1. The engine's sampling logprobs are not trained
on here: the train/inference mismatch (on a GPU: a bf16 training forward against the engine's fp32
weights and its own kernels) is only logged; mopd.py is where the paper corrects for it. A filtered
group's advantages are 0 already, so dropping it changes only the loss's denominator (and saves its
forward): a batch of mostly solved prompts still takes a full-sized step. The MoE router keeps
training with SFT's load-balancing loss (--freeze_router turns both off, as MOPD does). Tool calling
is multi-turn through the engine's environment hook.

What we drop: DAPO refills the batch after filtering (we train on the groups that survive); its soft
overlong penalty (we mask truncated responses, or give them reward 0); the separate inference
server (rollout.Engine runs the training weights).

The file: the objective J (policy_loss), the update (step 5 of the loop), the loop, the arguments.
A_i (group_advantages) lives in rl.py, because rlhf.py uses it too. Off the paper's recipe, marked
in the arguments: --epochs (several steps per batch, where the PPO clip binds) and --overlong (what
a truncated response gets).

Run: python grpo.py --init runs/sft/final --data runs/data --out runs/grpo --domains math   (or
torchrun --standalone --nproc_per_node=8 grpo.py ...: each rank rolls out its share of the prompts)
"""

import time

import torch

import common
import rl
import verifiers
from rl import group_advantages   # A_i, shared with rlhf.py (docs/paper.md, GRPO)


# ---- the objective J ------------------------------------------------------------------------------
def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, num_tokens=None):
    """Per-token PPO surrogate, aggregated as a token-level mean over the whole global batch.
    logprobs, old_logprobs, mask: [B, T] (log pi_theta, log pi_old of the sampled tokens; mask 1 on
    generated tokens); advantages: [B]. num_tokens: unmasked tokens of the *global* batch
    (rl.micro_batches), default mask.sum(). Returns (loss to minimize, clipped_B_T: 1 where the min
    picked the clipped term, never when strictly on-policy: the ratio is 1, the gradient REINFORCE's)."""
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    ratio = torch.exp(logprobs - old_logprobs)
    # PPO: min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), docs/paper.md's J with rho = pi/pi_old
    unclipped = ratio * advantages[:, None]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages[:, None]
    # J = (1 / sum_i |o_i|) sum_i sum_t ...: sum over every token, divided by the global token count
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / num_tokens
    return loss, ((clipped < unclipped) * mask).detach()


# ---- the update and the loop ------------------------------------------------------------------------
def update(run, args, samples, advantages_N, keep):
    """One rollout batch -> --epochs optimizer steps (1, the paper's) on the kept samples, minimizing -J
    (docs/paper.md, GRPO). -> (the step's Tally, the last gradient norm, or None: nothing trained)."""
    batches, num_tokens = rl.micro_batches(run, samples, keep, args.micro_batch)   # num_tokens: sum_i |o_i|
    tally, old, grad_norm = rl.Tally(samples, "clipped"), {}, None
    for epoch in range(args.epochs if num_tokens else 0):   # (nothing kept on any rank: no step)
        run.optimizer.zero_grad(set_to_none=True)
        for i, b in enumerate(batches):
            with run.autocast():
                logprobs_B_T, entropy_B_T, aux = rl.token_logprobs(run.model, b, args.temperature)
            # pi_old: the trainer's own logprobs before the batch's first step (ratio 1 in epoch 0)
            old_B_T = old.setdefault(i, logprobs_B_T.detach())
            loss, clipped_B_T = policy_loss(logprobs_B_T, old_B_T, advantages_N[b.index], b.mask_B_T,
                                            args.clip_low, args.clip_high, num_tokens)
            if not args.freeze_router:   # load balancing as in SFT, weighted by this batch's share
                loss = loss + run.model.config.router_aux_loss_coef * aux * b.mask_B_T.sum() / num_tokens
            loss.backward()
            if epoch == 0:
                tally.trained(b, logprobs_B_T, entropy_B_T)
            tally.add(b, clipped=clipped_B_T / args.epochs)
        grad_norm = rl.optimizer_step(run, args)
    return tally, grad_norm


def train(args):
    if (summary := common.finished_summary(args.out)) is not None:
        return summary
    run = rl.setup(args, freeze_router=args.freeze_router, resume_keys=("epochs",))
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    G, t_start = args.group_size, time.time()
    for step in range(run.step, args.steps):
        rl.set_lr(run, args, step)
        # 1. rollout: G responses to each of the step's prompts, from the policy itself
        rows_N, samples, texts, rollout_s = rl.rollout(run, args, step, sampling)
        # 2. reward: each domain's verifier
        domains_N = [r["domain"] for r in rows_N]
        rewards_N = torch.tensor(verifiers.score_many(domains_N, texts, [r["meta"] for r in rows_N]), dtype=torch.float64)
        truncated_N = torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool)
        if args.overlong == "penalize":
            rewards_N[truncated_N] = 0.0
        # 3. advantage: A_i, group-normalized (docs/paper.md, GRPO)
        advantages_N = group_advantages(rewards_N, G).float().to(run.dist.device)
        # 4. which samples train: groups whose rewards differ (DAPO), not cut off (--overlong mask)
        filtered_N = ~rl.has_signal(rewards_N, G) if args.filter_groups == "on" else torch.zeros_like(truncated_N)
        keep_N = ~filtered_N & ~truncated_N if args.overlong == "mask" else ~filtered_N
        # 5. the update
        t0 = time.time()
        tally, grad_norm = update(run, args, samples, advantages_N, keep_N.nonzero().squeeze(1).tolist())
        train_s = time.time() - t0
        # 6. the log
        row, g = rl.step_row(run, step, samples, domains_N, tally,
                             dict(reward=rewards_N, filtered=filtered_N, truncated=truncated_N), grad_norm,
                             rollout_s=rollout_s, train_s=train_s)
        n = max(g["samples"], 1)   # (0 when --skip_domains left out every prompt of the step)
        row.update(filtered_frac=g["filtered"] / n, truncated_frac=g["truncated"] / n,
                   clip_frac=g["clipped"] / max(g["tokens"], 1))
        rl.end_step(run, args, row, t_start)
    return rl.finish(run, args)


def build_parser():
    p = rl.rl_parser(__doc__, lr=3e-6, group_size=8, min_group=2)
    a = p.add_argument
    a("--temperature", type=common.pos_float, default=1.0,
      help="sampling temperature (> 0: the training forward divides the logits by it)")
    a("--top_p", type=common.positive(float, at_most=1.0), default=1.0,
      help="nucleus sampling (< 1: samples come from the truncated distribution, while the loss "
      "differentiates the whole policy's logprobs)")
    a("--filter_groups", default="on", choices=["on", "off"], help="drop groups with equal rewards")
    a("--freeze_router", action="store_true", help="freeze the MoE router (and drop its aux loss)")
    # off the paper's recipe, for experiments (and the tests that pin them)
    a("--epochs", type=common.pos_int, default=1,
      help="optimizer steps per rollout batch (> 1: off-policy after the first, and the PPO clip binds)")
    a("--clip_low", type=common.nonneg_float, default=0.2, help="PPO clip: ratio >= 1 - clip_low")
    a("--clip_high", type=common.nonneg_float, default=0.28,
      help="PPO clip: ratio <= 1 + clip_high (clip-higher)")
    a("--overlong", default="mask", choices=["mask", "penalize", "none"],
      help="a truncated response: no loss (DAPO's overlong filtering) / reward 0 / trained as it is")
    return p


def main(argv=None):
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
