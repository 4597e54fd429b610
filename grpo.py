"""
GRPO: the one policy-gradient stage behind every verifiable Cascade RL stage (IF-RL, multi-domain
RL, long-context RL, code RL, SWE RL); a stage is this file with its own prompt mix.

What the paper does (RECIPE.md): sample G responses per prompt from the current policy, score them
with a verifier, give every token of response i the advantage A_i = (r_i - mean(r)) / std(r) of its
group, and maximize the PPO surrogate averaged over all response tokens of the batch (a token-level
mean: long responses are not down-weighted). Strictly on-policy, one optimizer step per rollout
batch: the ratio is 1, the update is REINFORCE with group-normalized rewards. No KL. Groups with
all-equal rewards carry no signal and are dropped (DAPO's dynamic filtering).

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
server (rollout.Engine runs the training weights). A k3 KL to the start exists but is off.

Run: python grpo.py --init runs/sft/final --data runs/data --out runs/grpo --domains math   (or
torchrun --standalone --nproc_per_node=8 grpo.py ...: each rank rolls out its share of the prompts)
"""

import argparse
import os
import random
import time
from types import SimpleNamespace

import torch

import common
import data
import verifiers
from common import print0
from data import chat
from rollout import Engine, SamplingParams
from verifiers.tool import ToolEnv


# ---- the math ------------------------------------------------------------------------------------
def group_advantages(rewards, group_size, normalize_std=True, eps=1e-6):
    """rewards [N] in groups of `group_size` consecutive samples of one prompt -> advantages [N]:
    A_i = (r_i - mean_group) / (std_group + eps), the same for every token of response i.

    std is the population std (divide by G, not G - 1): the group is the whole set we normalize, not
    a sample of the prompt's rewards, so its advantages have mean 0 and mean square 1 (up to eps)
    whatever G is, and a group of one is defined (the unbiased std is 0/0 there). A group with zero
    spread gets exactly 0: its responses are equally good, nothing to learn."""
    if rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards, groups of {group_size}")
    r_P_G = rewards.reshape(-1, group_size)
    centered_P_G = r_P_G - r_P_G.mean(dim=1, keepdim=True)   # RECIPE.md GRPO: A_i
    if normalize_std:
        centered_P_G = centered_P_G / (r_P_G.std(dim=1, unbiased=False, keepdim=True) + eps)
    spread_P_1 = r_P_G.amax(dim=1, keepdim=True) - r_P_G.amin(dim=1, keepdim=True)
    return torch.where(spread_P_1 > 0, centered_P_G, 0.0).reshape(-1)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, num_tokens=None):
    """Per-token PPO surrogate, aggregated as a token-level mean over the whole global batch.
    logprobs, old_logprobs, mask: [B, T] (log pi_theta, log pi_old of the sampled tokens; mask 1 on
    generated tokens); advantages: [B] or [B, T]. num_tokens: unmasked tokens of the *global* batch
    (all-reduced by the caller), default mask.sum(). Returns (loss to minimize, fraction of unmasked
    tokens where the min picked the clipped term: 0 in strict on-policy training)."""
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    ratio = torch.exp(logprobs - old_logprobs)
    # PPO: min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), RECIPE.md's J with rho = pi/pi_old
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    # J = (1 / sum_i |o_i|) sum_i sum_t ...: sum over every token, divided by the global token count
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / num_tokens
    clip_frac = ((clipped < unclipped) * mask).sum().detach() / mask.sum().clamp(min=1)
    return loss, clip_frac


def k3(logprobs, ref_logprobs):
    """Per-token k3 estimate of KL(pi || ref) from samples of pi (unbiased, >= 0; Schulman 2020)."""
    return torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1.0


# ---- prompts, rollouts and the training forward (shared with mopd.py and rlhf.py) ----------------
def load_prompts(data_dir, domains, prompts_file=None, split="rl"):
    """-> {domain: [rows]} from DATA/<split>/<domain>.jsonl, or from one JSONL of mixed domains."""
    if prompts_file:
        rows = data.load_jsonl(prompts_file, "rl")
        pools = {d: [r for r in rows if r["domain"] == d] for d in domains}
    else:
        pools = {d: data.load_jsonl(os.path.join(data_dir, split, f"{d}.jsonl"), "rl", d) for d in domains}
    for d in [d for d in domains if not pools[d]]:
        raise ValueError(f"{prompts_file or os.path.join(data_dir, split)}: no prompts of domain '{d}'")
    return pools


def domains_and_mix(args):
    """--domains and --mix -> (domains, weights): known domains, each once; one finite weight >= 0
    per domain, not all 0. (cascade.py checks a recipe's stages with it before anything runs.)"""
    domains = args.domains.split(",")
    if any(d not in data.DOMAINS for d in domains) or len(set(domains)) < len(domains):
        raise ValueError(f"--domains {args.domains!r}: a comma list of {', '.join(data.DOMAINS)}, each once")
    try:
        mix = [float(w) for w in args.mix.split(",")] if args.mix else [1.0] * len(domains)
    except ValueError:
        mix = []
    if len(mix) != len(domains) or not all(0 <= w < float("inf") for w in mix) or sum(mix) <= 0:
        raise ValueError(f"--mix {args.mix!r}: one finite weight >= 0 per domain of {domains}, not all 0")
    return domains, mix


def sample_groups(engine, tok, rows, group_size, params, seed):
    """G responses per prompt -> (samples, texts), flat, the G of a prompt consecutive. The tool domain
    is multi-turn: at </tool_call> the environment (verifiers.tool.ToolEnv) runs that turn's calls and
    appends the results as a user turn; generation goes on (within max_new_tokens, tool output
    included). Elsewhere a tool call ends the turn."""
    env = ToolEnv()

    def env_hook(i, j, response_ids):
        if rows[i]["domain"] != "tool":
            return None
        results = env.respond(chat.decode(tok, response_ids))   # the latest turn's calls, executed
        return chat.tool_response_ids(tok, results, rows[i]["thinking"]) if results else None
    prompts = [chat.generation_prompt_ids(tok, r["messages"], r.get("tools"), r["thinking"]) for r in rows]
    params = SamplingParams(**params, stop_token_ids=tuple(chat.stop_ids(tok)),
                            hook_token_ids=(tok.token_to_id("</tool_call>"),))
    # (called with no rows too: under FSDP generate is a collective)
    groups = engine.generate(prompts, params, n=group_size, seed=seed, env_hook=env_hook)
    samples = [s for group in groups for s in group]
    # verifiers read the assistant turn: in thinking mode it opens with the <think> of the prompt, so
    # a response that never closes its reasoning has no answer (rather than its reasoning scored)
    opener = ["<think>\n" if r["thinking"] else "" for r in rows for _ in range(group_size)]
    return samples, [o + chat.decode(tok, s.token_ids) for o, s in zip(opener, samples)]


def empty_batch(pad_id, device):
    """A micro-batch with no target: its forward and backward run, its loss and gradient are 0."""
    zeros = torch.zeros(1, 1, device=device)
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    return dict(inputs_B_T=ids, targets_B_T=ids, mask_B_T=zeros, inf_logprobs_B_T=zeros,
                valid_B_T=zeros.bool())


def same_count(run, mbs, fill):
    """FSDP: every forward and backward all-gathers the weights from all ranks, so every rank must run
    as many micro-batches as the busiest one; the others get `fill`s (empty_batch). No-op otherwise."""
    if not common.is_sharded(run.model):
        return mbs
    n = torch.tensor(len(mbs), device=run.dist.device)
    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return mbs + [fill] * (n.item() - len(mbs))


def micro_batches(samples, size, pad_id, device):
    """Samples -> [(indices, batch)] of `size` sequences, sorted by length; a batch is right-padded
    [B, T] tensors: inputs_B_T predicts targets_B_T (shifted by one); mask_B_T is 1 where the target
    was generated by the model (not prompt, tool output, padding); inf_logprobs_B_T its engine logprob;
    valid_B_T is False on padding (the MoE aux loss skips it)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt_ids) + len(samples[i].token_ids))
    out = []
    for ix in [order[i:i + size] for i in range(0, len(order), size)]:
        batch = [samples[i] for i in ix]
        seqs = [s.prompt_ids + s.token_ids for s in batch]
        T = max(map(len, seqs)) - 1

        def pad(rows, value, dtype=torch.float32):   # right-pad every row to T
            return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=dtype, device=device)

        def response(s, x):   # per-response-token values x, placed at the response's targets
            return [0] * (len(s.prompt_ids) - 1) + list(x)
        out.append((ix, dict(inputs_B_T=pad([q[:-1] for q in seqs], pad_id, torch.long),
                             targets_B_T=pad([q[1:] for q in seqs], pad_id, torch.long),
                             mask_B_T=pad([response(s, s.gen_mask) for s in batch], 0),
                             inf_logprobs_B_T=pad([response(s, s.logprobs) for s in batch], 0),
                             valid_B_T=pad([[True] * (len(q) - 1) for q in seqs], False, torch.bool))))
    return out


def token_logprobs(model, batch, temperature=1.0):
    """log pi(target | prefix) for the masked targets of a batch (0 elsewhere), running the LM head
    only on those positions. -> (logprobs_B_T, entropy_B_T (no grad), aux_loss). Logits are divided
    by the sampling temperature: pi is then the distribution the engine sampled from."""
    mask_B_T = batch["mask_B_T"]
    idx_M = mask_B_T.flatten().nonzero().squeeze(1)
    logits_M_V, aux = model(batch["inputs_B_T"], logits_index=idx_M, token_mask_B_T=batch["valid_B_T"])
    logp_M_V = torch.log_softmax(logits_M_V.float() / temperature, dim=-1)
    lp_M = logp_M_V.gather(1, batch["targets_B_T"].flatten()[idx_M, None]).squeeze(1)
    flat = torch.zeros(mask_B_T.numel(), device=mask_B_T.device)
    entropy_M = -(logp_M_V.exp() * logp_M_V).sum(-1).detach()
    scatter = lambda v_M: flat.index_copy(0, idx_M, v_M).view_as(mask_B_T)   # back to [B, T]
    return scatter(lp_M), scatter(entropy_M), aux


def token_stats(sums, batch, logprobs_B_T, entropy_B_T, pad_id):
    """Add a micro-batch's forward tokens, entropy and train/inference mismatch to the log sums."""
    mask_B_T, diff_B_T = batch["mask_B_T"], logprobs_B_T.detach() - batch["inf_logprobs_B_T"]
    for key, v in [("fwd_tokens", batch["inputs_B_T"] != pad_id), ("entropy", entropy_B_T * mask_B_T),
                   ("mismatch_abs", diff_B_T.abs() * mask_B_T),
                   # k3 with the engine as the sampling policy: estimates KL(inference || train)
                   ("mismatch_k3", k3(batch["inf_logprobs_B_T"], logprobs_B_T.detach()) * mask_B_T)]:
        sums[key] = sums.get(key, 0.0) + v.sum().item()


def global_sums(values, device):
    """{name: local float} -> {name: sum over ranks} in one all-reduce."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    return dict(zip(values, common.all_reduce_sum(t).tolist()))


def per_domain(run, values_N, domains_N, name):
    """{"<domain>/<name>": sum of the values, "<domain>/n": their count} for global_sums."""
    out = {}
    for x in run.domains:
        values = [v for v, y in zip(values_N, domains_N) if y == x]
        out[f"{x}/{name}"], out[f"{x}/n"] = sum(values), len(values)
    return out


def optimizer_step(run, args):
    """Sum the gradients over ranks, clip their global norm to --grad_clip, step. -> the norm before
    clipping (the same on every rank)."""
    common.sync_grads(run.params)
    norm = common.clip_grad_norm(run.params, args.grad_clip if args.grad_clip > 0 else float("inf"),
                                 f"{args.out}: step {run.step}")
    run.optimizer.step()
    common.check_weights(run.model, f"{args.out}: step {run.step}")
    return norm.item()


# ---- the stage's skeleton (also mopd.py's and rlhf.py's): start or resume, roll out, log, finish
def setup(args, freeze_router=False):
    """An RL stage's state, as a plain namespace: the policy (OUT/last when resuming, else --init),
    tokenizer, optimizer, prompts by domain and rollout.Engine on the policy's own weights. The
    engine keeps its KV pool and CUDA graphs from step to step (so nothing is captured twice). The
    pool is sized for a step's rollout, capped at half the GPU's free memory; engine.release()
    before each update would hand it to training, at the price of a new pool and new captures
    every step."""
    d = common.init_distributed(args.device)
    last = os.path.join(args.out, "last")
    start = last if common.checkpoint_exists(last) else args.init
    fsdp = args.fsdp and d.world_size > 1
    model, state = common.load_checkpoint(start, "cpu" if fsdp else d.device)
    tok = data.load_tokenizer(os.path.join(start, "tokenizer.json"))
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"{start}: the tokenizer has {tok.get_vocab_size()} tokens > vocab_size "
                         f"{model.config.vocab_size}")
    for name, p in model.named_parameters():
        p.requires_grad_(not (freeze_router and name.endswith("mlp.gate.weight")))   # the MoE router
    if fsdp:
        common.shard(model, d.device)   # the engine gathers the weights for rollouts
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)   # none in RL
    if start == last:   # resuming (a checkpoint written with or without --fsdp, by any number of ranks)
        common.check_same_args(last, state, args, ("seed", "group_size", "prompts_per_step", "domains", "mix",
                                                   "thinking", "prompts"))
        common.load_optimizer(last, model, opt, state)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and d.device.type == "cuda")
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # the rollout engine runs the fp32 weights
    domains, mix = domains_and_mix(args)
    step = state.get("step", 0) if start == last else 0   # steps done (rows are numbered from 0)
    metrics = os.path.join(args.out, "metrics.jsonl")
    # the rows of the steps before `step`, for the summary over the last steps (a resumed run's too):
    # the step rows the logger below keeps when it drops the steps after the checkpoint (it keeps rows
    # without a "step" too, such as rlhf.py's reward-model rows, but those are no steps)
    history = ([r for r in common.read_metrics(metrics) if r.get("step", step) < step]
               if step and os.path.exists(metrics) else [])
    return SimpleNamespace(
        dist=d, model=model, tok=tok, tok_path=os.path.join(start, "tokenizer.json"), optimizer=opt,
        params=params, step=step, domains=domains, mix=mix,
        autocast=lambda: torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16),
        logger=common.MetricsLogger(metrics, drop_from_step=step), history=history,
        pools=load_prompts(args.data, domains, args.prompts), engine=Engine(model))


def set_lr(run, args, step):
    """Every RL stage's schedule: linear warmup over --warmup steps, then constant --lr."""
    run.step = step   # the step under way (optimizer_step names it when the training diverges)
    for group in run.optimizer.param_groups:
        group["lr"] = common.lr_at(step, args.steps, args.warmup, args.lr, schedule="constant")


def rollout_step(run, args, step, sampling, reward_fn=None):
    """Draw the step's prompts (deterministic from (seed, step): a domain from the mix, then a
    prompt); roll out this rank's share, G responses each; score them with the verifiers (or
    reward_fn(rows_N, texts_N)). -> (rows_N, samples_N, rewards_N, stats to log)"""
    rng, rows = random.Random(f"prompts-{args.seed}-{step}"), []
    for _ in range(args.prompts_per_step):
        row = rng.choice(run.pools[rng.choices(run.domains, weights=run.mix)[0]])
        think = rng.random() < 0.5 if args.thinking == "mixed" else args.thinking == "on"
        rows.append(dict(row, thinking=think))
    rows = rows[run.dist.rank::run.dist.world_size]   # shares may differ by one: sums are global
    t0 = time.time()
    samples, texts = sample_groups(run.engine, run.tok, rows, args.group_size, sampling,
                                   seed=(args.seed * 100_003 + step) * run.dist.world_size + run.dist.rank)
    stats = dict(rollout_s=time.time() - t0, samples=len(samples),
                 gen_tokens=sum(sum(s.gen_mask) for s in samples),
                 resp_tokens=sum(len(s.token_ids) for s in samples))
    rows_N = [r for r in rows for _ in range(args.group_size)]
    domains_N = [r["domain"] for r in rows_N]
    rewards = (verifiers.score_many(domains_N, texts, [r["meta"] for r in rows_N]) if reward_fn is None
               else reward_fn(rows_N, texts))
    return rows_N, samples, rewards, dict(stats, **per_domain(run, rewards, domains_N, "reward"))


def step_row(run, step, stats):
    """The step's local stats -> global sums -> the metrics every RL stage logs (and g, the sums)."""
    g = global_sums({k: v for k, v in stats.items() if k != "grad_norm"}, run.dist.device)
    n, world = max(g["tokens"], 1), run.dist.world_size
    row = dict(step=step, lr=run.optimizer.param_groups[0]["lr"],
               **{f"reward/{x}": g[f"{x}/reward"] / g[f"{x}/n"] for x in run.domains if g[f"{x}/n"]})
    row.update(response_len=g["resp_tokens"] / g["samples"], trained_tokens=g["tokens"],
               entropy=g["entropy"] / n, mismatch_abs=g["mismatch_abs"] / n, mismatch_k3=g["mismatch_k3"] / n,
               # seconds summed over ranks / world = each rank's mean time
               rollout_tok_s=g["gen_tokens"] / g["rollout_s"] * world,
               train_tok_s=g["fwd_tokens"] / max(g["train_s"], 1e-9) * world)
    if "grad_norm" in stats:   # already global (no step: no norm)
        row["grad_norm"] = stats["grad_norm"]
    return row, g


def end_step(run, args, row):
    """Log the step's row, print it every log_every steps, write OUT/last every save_every steps."""
    step, last = row["step"], row["step"] + 1 == args.steps
    run.logger.log(row)
    run.history.append(row)
    if step % args.log_every == 0 or last:
        print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if args.save_every and (step + 1) % args.save_every == 0 and not last:
        common.save_checkpoint(os.path.join(args.out, "last"), run.model, run.tok_path, run.optimizer,
                               dict(step=step + 1, args=vars(args)))


def finish(run, args):
    """OUT/final with the summary: each reward/eval metric averaged over the last 5 steps."""
    recent = run.history[-5:]
    summary = {k: sum(r[k] for r in recent if k in r) / sum(k in r for r in recent)
               for k in {k for r in recent for k in r if k.startswith(("reward/", "eval", "reverse_kl/"))}}
    common.save_final(args.out, run.model, run.tok_path, dict(step=args.steps, summary=summary))
    return summary


# ---- GRPO ----------------------------------------------------------------------------------------
def grpo_update(run, args, samples, advantages_N, ref=None):
    """One rollout batch -> args.epochs optimizer steps (1 = strict on-policy). Returns local sums."""
    pad_id = run.tok.token_to_id(chat.PAD)
    mbs = micro_batches(samples, args.micro_batch, pad_id, run.dist.device)
    mbs = same_count(run, mbs, ([], empty_batch(pad_id, run.dist.device)))
    local = sum(b["mask_B_T"].sum().item() for _, b in mbs)
    num_tokens = global_sums(dict(n=local), run.dist.device)["n"]   # sum_i |o_i| of the global batch
    sums = dict(tokens=local, fwd_tokens=0, entropy=0, mismatch_abs=0, mismatch_k3=0, clip=0, kl=0)
    if num_tokens == 0:          # every group filtered on every rank: nothing to learn this step
        return sums
    with torch.no_grad(), run.autocast():   # the KL reference's logprobs, once per rollout batch
        ref_lps = [None if ref is None else token_logprobs(ref, b, args.temperature)[0] for _, b in mbs]
    old_lps = [None] * len(mbs)   # log pi_old: the trainer's own logprobs in the first epoch
    for epoch in range(args.epochs):
        run.optimizer.zero_grad(set_to_none=True)
        for i, ((ix, b), ref_lp_B_T) in enumerate(zip(mbs, ref_lps)):
            mask_B_T = b["mask_B_T"]
            with run.autocast():
                lp_B_T, ent_B_T, aux = token_logprobs(run.model, b, args.temperature)
            if epoch == 0:   # the weights have not moved yet: pi_old = pi_theta, the ratio is exactly 1
                old_lps[i] = lp_B_T.detach()
            loss, clip_frac = policy_loss(lp_B_T, old_lps[i], advantages_N[ix], mask_B_T,
                                          args.clip_low, args.clip_high, num_tokens)
            if ref_lp_B_T is not None:
                kl = (k3(lp_B_T, ref_lp_B_T) * mask_B_T).sum() / num_tokens
                loss = loss + args.kl_coef * kl
                sums["kl"] += kl.item() * num_tokens / args.epochs
            if not args.freeze_router:   # load balancing as in SFT, weighted by this batch's share
                loss = loss + run.model.config.router_aux_loss_coef * aux * mask_B_T.sum() / num_tokens
            loss.backward()
            sums["clip"] += clip_frac.item() * mask_B_T.sum().item() / args.epochs
            if epoch == 0:
                token_stats(sums, b, lp_B_T, ent_B_T, pad_id)
        sums["grad_norm"] = optimizer_step(run, args)
    return sums


def train(args, reward_fn=None):
    """The GRPO loop. reward_fn(rows_N, texts_N) -> one reward per sample (default: the verifiers
    of the rows' domains); rlhf.py passes its reward model."""
    if (summary := common.finished_summary(args.out)) is not None:
        return summary
    run = setup(args, freeze_router=args.freeze_router)
    ref = None
    if args.kl_coef > 0:   # the KL reference (off by default): the stage's frozen starting checkpoint
        ref = common.load_checkpoint(args.init, run.dist.device)[0].eval().requires_grad_(False)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    G = args.group_size
    for step in range(run.step, args.steps):
        set_lr(run, args, step)
        _, samples, rewards, stats = rollout_step(run, args, step, sampling, reward_fn)
        truncated_N = torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool)
        rewards_N = torch.tensor(rewards, dtype=torch.float64)
        if args.overlong == "penalize":   # truncated: reward 0
            rewards_N[truncated_N] = 0.0
        advantages_N = group_advantages(rewards_N, G).float().to(run.dist.device)
        no_signal_P = rewards_N.view(-1, G).amax(1) == rewards_N.view(-1, G).amin(1)
        drop_N = torch.zeros(len(samples), dtype=torch.bool)
        if args.filter_groups == "on":   # DAPO's dynamic filtering: equal rewards, no signal
            drop_N |= no_signal_P.repeat_interleave(G)
        if args.overlong == "mask":      # DAPO's overlong filtering: truncated, no loss
            drop_N |= truncated_N
        kept = (~drop_N).nonzero().squeeze(1).tolist()
        t0 = time.time()
        stats.update(grpo_update(run, args, [samples[i] for i in kept], advantages_N[kept], ref),
                     train_s=time.time() - t0, groups=len(no_signal_P),
                     filtered=no_signal_P.sum().item() if args.filter_groups == "on" else 0,
                     truncated=truncated_N.sum().item())
        row, g = step_row(run, step, stats)
        row.update(filtered_frac=g["filtered"] / g["groups"], truncated_frac=g["truncated"] / g["samples"],
                   clip_frac=g["clip"] / max(g["tokens"], 1), kl_ref=g["kl"] / max(g["tokens"], 1))
        end_step(run, args, row)
    return finish(run, args)


def add_rl_args(p, lr, group_size, min_group=1):
    """The arguments every RL stage shares (grpo.py, mopd.py, rlhf.py); no abbreviations."""
    p.formatter_class, p.allow_abbrev, a = argparse.ArgumentDefaultsHelpFormatter, False, p.add_argument
    a("--init", required=True, help="start checkpoint directory (HF layout + tokenizer.json)")
    a("--out", required=True, help="run directory: metrics.jsonl, last/ (resumable), final/")
    a("--data", required=True, help="data directory: rl/<domain>.jsonl, eval/<domain>.jsonl, prefs/")
    a("--seed", type=int, default=0, help="seed of the prompt order and of the rollouts")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 autocast on CUDA")
    a("--steps", type=common.pos_int, default=20, help="RL steps (one rollout batch each)")
    a("--lr", type=common.pos_float, default=lr, help="learning rate (AdamW), constant after the warmup")
    a("--warmup", type=common.nonneg_int, default=2, help="linear warmup steps")
    a("--grad_clip", type=common.nonneg_float, default=1.0, help="max global gradient norm (0: off)")
    a("--domains", default="math", help="comma-separated domains to draw prompts from")
    a("--mix", default="", help="comma-separated prompt-mix weights, one per domain (default: equal)")
    a("--prompts", help="RL prompts JSONL with a 'domain' per row, instead of DATA/rl/<domain>.jsonl")
    a("--group_size", type=common.at_least(min_group, "a group of one has no spread: every advantage is 0, "
      "nothing is learned"), default=group_size, help="G: responses sampled per prompt")
    a("--prompts_per_step", type=common.pos_int, default=16, help="prompts per step, global over all ranks")
    a("--max_new_tokens", type=common.pos_int, default=256, help="cap on each response (tool output included)")
    a("--thinking", default="on", choices=["on", "off", "mixed"], help="chat-template mode of prompts")
    a("--micro_batch", type=common.pos_int, default=16, help="sequences per training forward (a memory knob)")
    a("--save_every", type=common.nonneg_int, default=0, help="write OUT/last every N steps (0: never)")
    a("--fsdp", action="store_true", help="shard the policy's weights, gradients and optimizer state "
      "over the ranks (FSDP2); rollouts gather the full weights; no effect on one process")
    a("--log_every", type=common.pos_int, default=1, help="print a progress line every N steps")
    return p


def build_parser():
    p = add_rl_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), lr=3e-6, group_size=8, min_group=2)
    a = p.add_argument
    a("--temperature", type=common.pos_float, default=1.0,
      help="sampling temperature (> 0: the training forward divides the logits by it)")
    a("--top_p", type=common.positive(float, at_most=1.0), default=1.0,
      help="nucleus sampling (< 1: samples come from the truncated distribution, while the loss "
      "differentiates the whole policy's logprobs)")
    a("--epochs", type=common.pos_int, default=1,
      help="optimizer steps per rollout batch (>1: the PPO clip binds)")
    a("--clip_low", type=common.nonneg_float, default=0.2, help="PPO clip: ratio >= 1 - clip_low")
    a("--clip_high", type=common.nonneg_float, default=0.28,
      help="PPO clip: ratio <= 1 + clip_high (clip-higher)")
    a("--kl_coef", type=common.nonneg_float, default=0.0, help="k3 KL penalty to --init (0: none, as in the "
      "paper's verifiable-reward RL; its RLHF reportedly uses 0.03)")
    a("--overlong", default="mask", choices=["mask", "penalize", "none"],
      help="truncated: no loss / reward 0 (a verifier's worst; a reward model's scores can be below 0)")
    a("--filter_groups", default="on", choices=["on", "off"], help="drop groups with equal rewards")
    a("--freeze_router", action="store_true", help="freeze the MoE router (and drop its aux loss)")
    return p


def main(argv=None):
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
