"""
On-policy RL: what every RL stage (grpo.py, mopd.py, rlhf.py) runs that is no one method's idea. A
stage's loop calls, in order: set_lr; rollout (the step's prompts, G responses to each from the
policy's own weights); the stage's own reward and advantage; its update, built from micro_batches,
token_logprobs and optimizer_step; then step_row and end_step (the log, held-out scores, OUT/last)
and, at the end, finish (OUT/final). setup builds the run (rl.Run), resuming from OUT/last. Also
here: GRPO's group advantage, which RLHF uses too, and the one evaluation (evaluate: the cascade's
table, every stage's --eval_every, RLHF's judge).

The global mean, one rule for every stage (sft.py's too): each rank divides its loss by the count
of the *global* batch (its trained tokens; MOPD's: its responses, each a token mean), and gradients
are summed over ranks, never averaged (common.sync_grads; FSDP set to sum, common.shard): their sum
is the gradient of the mean over the global batch, however the samples fall on ranks and
micro-batches.
"""

import argparse
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import common
import data
import verifiers
from common import print0
from data import chat
from rollout import Engine, SamplingParams
from verifiers.tool import ToolEnv


# ---- the group advantage (GRPO's and RLHF's) and the k3 estimator -------------------------------
def group_advantages(rewards, group_size, normalize_std=True, eps=1e-6):
    """rewards [N] in groups of `group_size` consecutive samples of one prompt -> advantages [N]:
    A_i = (r_i - mean_group) / (std_group + eps), the same for every token of response i.

    std is the population std (divide by G, not G - 1): the group is the whole set we normalize, not
    a sample of the prompt's rewards, so its advantages have mean 0 and mean square 1 (up to eps)
    whatever G is, and a group of one is defined (the unbiased std is 0/0 there). A group with zero
    spread (no signal) gets exactly 0: its responses are equally good, nothing to learn."""
    if rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards, groups of {group_size}")
    r_P_G = rewards.reshape(-1, group_size)
    centered_P_G = r_P_G - r_P_G.mean(dim=1, keepdim=True)   # docs/paper.md, GRPO: A_i
    if normalize_std and len(r_P_G):   # (a rank may have no prompts in a step)
        centered_P_G = centered_P_G / (r_P_G.std(dim=1, unbiased=False, keepdim=True) + eps)
    return torch.where(has_signal(rewards, group_size), centered_P_G.reshape(-1), 0.0)


def has_signal(rewards_N, group_size):
    """True for the samples of groups whose rewards differ. The others carry no signal (their
    advantages are all 0): DAPO's dynamic filtering drops them (grpo.py's docstring says what that changes)."""
    r_P_G = rewards_N.view(-1, group_size)
    return (r_P_G.amax(1) > r_P_G.amin(1)).repeat_interleave(group_size)


def k3(logprobs, ref_logprobs):
    """Per-token k3 = rho - log rho - 1, rho = ref / pi, on tokens sampled from pi (Schulman 2020).
    Its *value* is an unbiased, >= 0 estimate of KL(pi || ref). Its *gradient* in a loss is not that
    KL's: differentiated through log pi with the samples held fixed, E_pi[grad k3] = E_pi[(1 - rho)
    grad log pi] = -sum_y ref(y) grad log pi(y) = grad KL(ref || pi), the forward KL (checked in
    float64 by tests/test_rl_math.py). Both pull pi toward ref."""
    return torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1.0


# ---- prompts and rollouts ------------------------------------------------------------------------
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
    skip = [d for d in args.skip_domains.split(",") if d]
    if set(skip) - set(domains) or not any(w for d, w in zip(domains, mix) if d not in skip):
        raise ValueError(f"--skip_domains {args.skip_domains!r}: domains of --domains {args.domains!r}, "
                         "leaving one of weight > 0 to train on")
    return domains, mix


def step_prompts(run, args, step):
    """The step's --prompts_per_step prompts, deterministic from (seed, step): a domain from the mix,
    then a prompt of it, and its chat mode. Those of --skip_domains are drawn, then left out, so the
    rest are exactly the prompts of a run without the flag (MOPD's, for its GRPO control, which has
    no reward for chat). -> this rank's share of them (shares may differ by one)."""
    rng, rows = random.Random(f"prompts-{args.seed}-{step}"), []
    for _ in range(args.prompts_per_step):
        row = rng.choice(run.pools[rng.choices(run.domains, weights=run.mix)[0]])
        think = rng.random() < 0.5 if args.thinking == "mixed" else args.thinking == "on"
        rows.append(dict(row, thinking=think))
    rows = [r for r in rows if r["domain"] not in args.skip_domains.split(",")]
    return rows[run.dist.rank::run.dist.world_size]


def rollout(run, args, step, sampling):
    """Step 1 of every RL stage: --group_size responses to each of this rank's share of the step's
    prompts (step_prompts), sampled from the policy with an engine seed distinct for every (seed,
    step, rank). -> (rows_N: each sample's prompt row, samples, texts, seconds it took)"""
    t0, rows = time.time(), step_prompts(run, args, step)
    seed = (args.seed * 100_003 + step) * run.dist.world_size + run.dist.rank
    samples, texts = sample_groups(run.engine, run.tok, rows, args.group_size, sampling, seed)
    return [r for r in rows for _ in range(args.group_size)], samples, texts, time.time() - t0


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


@torch.no_grad()
def evaluate(engine, tok, rows, max_new_tokens, dd, samples=0):
    """The one evaluation (cascade.py's table, every stage's --eval_every, RLHF's judge): each row's
    score by its domain's verifier -> [score per row], in row order, on every rank. samples = 0: the
    greedy answer's score; k > 0: the mean score of k answers sampled at temperature 1 (the RL
    temperature; a fixed seed, so two checkpoints are scored on the same draws). Rank r answers rows
    r, r + W, ...; every rank must call it."""
    mine, k = rows[dd.rank::dd.world_size], max(1, samples)
    params = dict(temperature=1.0 if samples else 0.0, max_new_tokens=max_new_tokens)
    texts = sample_groups(engine, tok, mine, k, params, seed=0)[1]
    flat = verifiers.score_many([r["domain"] for r in mine for _ in range(k)], texts,
                                [r["meta"] for r in mine for _ in range(k)])
    scores = [sum(flat[i * k:(i + 1) * k]) / k for i in range(len(mine))]
    if dd.world_size == 1:
        return scores
    parts = [None] * dd.world_size
    dist.all_gather_object(parts, scores)
    return [parts[i % dd.world_size][i // dd.world_size] for i in range(len(rows))]


# ---- training batches and the training forward ---------------------------------------------------
@dataclass
class MicroBatch:
    """Samples as right-padded [B, T] tensors: inputs_B_T predicts targets_B_T (shifted by one);
    mask_B_T is 1 where the target was generated by the model (not prompt, tool output, padding);
    inf_logprobs_B_T its engine logprob; valid_B_T is False on padding (the MoE aux loss skips it).
    index: which of the step's samples its rows are (empty for a filler, see micro_batches)."""
    index: list
    inputs_B_T: torch.Tensor
    targets_B_T: torch.Tensor
    mask_B_T: torch.Tensor
    inf_logprobs_B_T: torch.Tensor
    valid_B_T: torch.Tensor
    domain: str = ""


def micro_batches(run, samples, keep, size, domains_N=None):
    """The kept samples (indices into `samples`) -> (MicroBatches of `size` sequences sorted by
    length (less padding), sum_i |o_i|: the trained tokens of the whole global batch (every rank's),
    the denominator of GRPO's and RLHF's token-level mean). With domains_N each micro-batch holds one
    domain's samples (MOPD: one teacher scores it). Under FSDP every forward and backward all-gathers
    the weights from all ranks, so every rank runs as many micro-batches as the busiest one; the
    others run fillers (one pad token, mask 0: their loss and gradient are 0)."""
    chunks, out, device = [], [], run.dist.device
    for domain in [""] if domains_N is None else sorted(set(domains_N)):
        order = sorted([i for i in keep if domains_N is None or domains_N[i] == domain],
                       key=lambda i: len(samples[i].prompt_ids) + len(samples[i].token_ids))
        chunks += [(domain, order[i:i + size]) for i in range(0, len(order), size)]
    for domain, ix in chunks:
        batch = [samples[i] for i in ix]
        seqs = [s.prompt_ids + s.token_ids for s in batch]
        T = max(map(len, seqs)) - 1

        def pad(rows, value, dtype=torch.float32):   # right-pad every row to T
            return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=dtype, device=device)

        def response(s, x):   # per-response-token values x, placed at the response's targets
            return [0] * (len(s.prompt_ids) - 1) + list(x)
        out.append(MicroBatch(ix, pad([q[:-1] for q in seqs], run.pad_id, torch.long),
                              pad([q[1:] for q in seqs], run.pad_id, torch.long),
                              pad([response(s, s.gen_mask) for s in batch], 0),
                              pad([response(s, s.logprobs) for s in batch], 0),
                              pad([[True] * (len(q) - 1) for q in seqs], False, torch.bool), domain))
    if common.is_sharded(run.model):
        n = torch.tensor(len(out), device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        zeros, ids = torch.zeros(1, 1, device=device), torch.full((1, 1), run.pad_id, device=device)
        out += [MicroBatch([], ids, ids, zeros, zeros, zeros.bool(), run.domains[0])] * (n.item() - len(out))
    return out, common.global_sums(dict(n=sum(b.mask_B_T.sum().item() for b in out)), device)["n"]


def token_logprobs(model, batch, temperature=1.0):
    """log pi(target | prefix) for the masked targets of a batch (0 elsewhere), running the LM head
    only on those positions. -> (logprobs_B_T, entropy_B_T (no grad), aux_loss). Logits are divided
    by the sampling temperature: pi is then the distribution the engine sampled from."""
    mask_B_T = batch.mask_B_T
    idx_M = mask_B_T.flatten().nonzero().squeeze(1)
    logits_M_V, aux = model(batch.inputs_B_T, logits_index=idx_M, token_mask_B_T=batch.valid_B_T)
    logp_M_V = torch.log_softmax(logits_M_V.float() / temperature, dim=-1)
    lp_M = logp_M_V.gather(1, batch.targets_B_T.flatten()[idx_M, None]).squeeze(1)
    flat = torch.zeros(mask_B_T.numel(), device=mask_B_T.device)
    entropy_M = -(logp_M_V.exp() * logp_M_V).sum(-1).detach()
    scatter = lambda v_M: flat.index_copy(0, idx_M, v_M).view_as(mask_B_T)   # back to [B, T]
    return scatter(lp_M), scatter(entropy_M), aux


def optimizer_step(run, args):
    """Sum the gradients over ranks, clip their global norm to --grad_clip, step. -> the norm before
    clipping (the same on every rank)."""
    where = f"{args.out}: step {run.current}"   # what a divergence names
    common.sync_grads(run.params)
    norm = common.clip_grad_norm(run.params, args.grad_clip if args.grad_clip > 0 else float("inf"), where)
    run.optimizer.step()
    common.check_weights(run.model, where)
    return norm.item()


# ---- the run: its state, start or resume, the step's log, the end ---------------------------------
@dataclass
class Run:
    """An RL stage's state. step: the steps done (a resumed run starts there); history: their rows."""
    dist: common.Dist
    model: torch.nn.Module
    tok: object                   # a tokenizers.Tokenizer
    tok_path: str
    optimizer: torch.optim.Optimizer
    params: list
    engine: Engine
    pools: dict                   # domain -> its prompt rows
    domains: list
    mix: list
    bf16: bool
    logger: common.MetricsLogger
    step: int = 0                 # steps done when this process started (resume point)
    current: int = 0              # the step under way (set_lr): what a divergence names
    history: list = field(default_factory=list)
    heldout: list = field(default_factory=list)   # the prompts of --eval_every (heldout_rows)

    @property
    def pad_id(self):
        return self.tok.token_to_id(chat.PAD)

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def setup(args, freeze_router=False, resume_keys=()):
    """The policy (OUT/last when resuming, else --init), tokenizer, optimizer, prompts by domain and
    rollout.Engine on the policy's own weights. The engine keeps its KV pool and CUDA graphs from
    step to step (nothing is captured twice); the pool is sized for a step's rollout, capped at half
    the GPU's free memory. A resumed run must have the arguments that decide its batches."""
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
    step = 0
    if start == last:   # resuming (a checkpoint written with or without --fsdp, by any number of ranks)
        state.setdefault("args", {}).setdefault("skip_domains", "")   # (written before the flag: none skipped)
        common.check_same_args(last, state, args, ("seed", "group_size", "prompts_per_step", "domains",
                                                   "mix", "skip_domains", "thinking", "prompts") + tuple(resume_keys))
        common.load_optimizer(last, model, opt, state)
        step = state.get("step", 0)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # the rollout engine runs the fp32 weights
    domains, mix = domains_and_mix(args)
    metrics = os.path.join(args.out, "metrics.jsonl")
    # the rows of the steps before `step`, for the summary over the last steps (a resumed run's too);
    # the logger drops the rows of steps after the checkpoint, which this run logs again
    history = ([r for r in common.read_metrics(metrics) if r.get("step", step) < step]
               if step and os.path.exists(metrics) else [])
    return Run(dist=d, model=model, tok=tok, tok_path=os.path.join(start, "tokenizer.json"),
               optimizer=opt, params=params, engine=Engine(model),
               pools=load_prompts(args.data, domains, args.prompts), domains=domains, mix=mix,
               bf16=args.dtype == "bfloat16" or (args.dtype == "auto" and d.device.type == "cuda"),
               logger=common.MetricsLogger(metrics, drop_from_step=step), step=step, history=history,
               heldout=heldout_rows(args, domains, d) if args.eval_every else [])


def heldout_rows(args, domains, dd):
    """The held-out prompts a stage scores itself on every --eval_every steps: the first
    --eval_prompts of DATA/eval/<domain>.jsonl for each of --eval_domains (default: --domains), in
    the chat mode cascade.py's table scores them (--eval_thinking; math always thinks, as the
    table's math column does), so that a curve starts at the table's score of the stage before.
    With --eval_reference, each chat row carries that checkpoint's judge score (scored here, once):
    chat's curve is then the judge's win rate against it, as the table's chat column is."""
    eval_domains = args.eval_domains.split(",") if args.eval_domains else domains
    pools = load_prompts(args.data, eval_domains, split="eval")
    rows = [dict(r, thinking=d == "math" or args.eval_thinking == "on") for d in eval_domains
            for r in pools[d][:args.eval_prompts]]
    chat_rows = [r for r in rows if r["domain"] == "chat"]
    if args.eval_reference and chat_rows:
        engine = Engine(common.load_checkpoint(args.eval_reference, dd.device)[0])
        tok = data.load_tokenizer(os.path.join(args.eval_reference, "tokenizer.json"))
        for r, s in zip(chat_rows, heldout_row_scores(engine, tok, chat_rows, args, dd)):
            r["reference"] = s
        engine.release()
    return rows


def heldout_row_scores(engine, tok, rows, args, dd):
    """[score of each row] of `engine`'s model, in row order, scored as cascade.py's table is:
    --eval_samples, except the domains of --eval_greedy (the table's sparse ones), always greedy."""
    greedy = set(args.eval_greedy.split(",")) if args.eval_samples else set()
    scores = [None] * len(rows)
    for samples, sparse in ((args.eval_samples, False), (0, True)):
        index = [i for i, r in enumerate(rows) if (r["domain"] in greedy) == sparse]
        part = evaluate(engine, tok, [rows[i] for i in index], args.eval_max_new_tokens or args.max_new_tokens,
                        dd, samples) if index else []
        for i, s in zip(index, part):
            scores[i] = s
    return scores


def heldout_scores(engine, tok, rows, args, dd):
    """{domain: mean score} of `engine`'s model on `rows` (heldout_rows); a row with a reference score
    counts 1 for a win over it, 1/2 for a tie (verifiers.chat.wins), as the table's chat column does."""
    scores = {}
    for r, s in zip(rows, heldout_row_scores(engine, tok, rows, args, dd)):
        scores.setdefault(r["domain"], []).append(verifiers.chat.wins([s], [r["reference"]])[0]
                                                  if "reference" in r else s)
    return {d: sum(v) / len(v) for d, v in scores.items()}


def set_lr(run, args, step):
    """Every RL stage's schedule: linear warmup over --warmup steps, then constant --lr."""
    run.current = step
    for group in run.optimizer.param_groups:
        group["lr"] = common.lr_at(step, args.steps, args.warmup, args.lr, schedule="constant")


class Tally:
    """A step's statistics, from what its updates return: for each of this rank's samples, the sum
    over its trained tokens of each named per-token value (entropy, the train/inference mismatch,
    and a stage's own: GRPO's clipped tokens, MOPD's advantages, ...). The names are fixed up front,
    so every rank reduces the same ones, whatever its batches held."""

    def __init__(self, samples, *names):
        names = ("tokens", "entropy", "mismatch_abs", "mismatch_k3") + names
        self.sums = {k: torch.zeros(len(samples), dtype=torch.float64) for k in names}
        self.fwd_tokens = 0

    def trained(self, batch, logprobs_B_T, entropy_B_T):
        """A micro-batch's first training forward: its tokens, their entropy and their mismatch."""
        diff_B_T = logprobs_B_T.detach() - batch.inf_logprobs_B_T
        self.fwd_tokens += batch.valid_B_T.sum().item()
        self.add(batch, tokens=torch.ones_like(diff_B_T), entropy=entropy_B_T, mismatch_abs=diff_B_T.abs(),
                 # k3 with the engine as the sampling policy: estimates KL(inference || train)
                 mismatch_k3=k3(batch.inf_logprobs_B_T, logprobs_B_T.detach()))

    def add(self, batch, **values_B_T):
        """Per-token values of a micro-batch, summed per sample over its trained tokens."""
        if not batch.index:   # a filler
            return
        for name, v_B_T in values_B_T.items():
            self.sums[name].index_add_(0, torch.tensor(batch.index), (v_B_T.detach().double() * batch.mask_B_T).sum(1).cpu())


def step_row(run, step, samples, domains_N, tally, per_sample, grad_norm, **times):
    """The step's row of the metrics log, from the tally and the per-sample values ({name: [N]}: the
    "reward", and a stage's own) of every rank (one all-reduce). -> (row, g): g holds the global sums,
    g[name] and per domain g[f"{domain}/{name}"], for a stage's own keys. grad_norm: None when nothing
    was trained; times: rollout_s, train_s (this rank's seconds)."""
    local = dict(samples=len(samples), gen_tokens=sum(sum(s.gen_mask) for s in samples),
                 resp_tokens=sum(len(s.token_ids) for s in samples), fwd_tokens=tally.fwd_tokens, **times)
    index = {dom: [i for i, x in enumerate(domains_N) if x == dom] for dom in run.domains}
    local.update({f"{dom}/n": len(ix) for dom, ix in index.items()})
    for name, values in dict(tally.sums, **per_sample).items():
        values = torch.as_tensor(values, dtype=torch.float64)
        local[name] = values.sum().item()
        local.update({f"{dom}/{name}": values[ix].sum().item() for dom, ix in index.items()})
    g = common.global_sums(local, run.dist.device)
    n, world = max(g["tokens"], 1), run.dist.world_size
    row = dict(step=step, lr=run.optimizer.param_groups[0]["lr"],
               **{f"reward/{x}": g[f"{x}/reward"] / g[f"{x}/n"] for x in run.domains if g[f"{x}/n"]})
    row.update(response_len=g["resp_tokens"] / max(g["samples"], 1), trained_tokens=g["tokens"],
               entropy=g["entropy"] / n, mismatch_abs=g["mismatch_abs"] / n, mismatch_k3=g["mismatch_k3"] / n,
               # seconds summed over ranks / world = each rank's mean time
               rollout_tok_s=g["gen_tokens"] / max(g["rollout_s"], 1e-9) * world,
               train_tok_s=g["fwd_tokens"] / max(g["train_s"], 1e-9) * world)
    if grad_norm is not None:   # (the same on every rank)
        row["grad_norm"] = grad_norm
    return row, g


def end_step(run, args, row, t_start):
    """Score the held-out prompts every --eval_every steps (eval/<domain>, after step + 1 updates);
    log the step's row; print it with the step count and an ETA every --log_every steps; write
    OUT/last every --save_every steps."""
    step, last = row["step"], row["step"] + 1 == args.steps
    if run.heldout and ((step + 1) % args.eval_every == 0 or last):
        row.update({f"eval/{d}": s for d, s in heldout_scores(run.engine, run.tok, run.heldout, args, run.dist).items()})
    run.logger.log(row)
    run.history.append(row)
    if step % args.log_every == 0 or last:
        done = step + 1 - run.step   # steps this process ran
        eta = (time.time() - t_start) / done * (args.steps - step - 1)
        print0(f"step {step + 1}/{args.steps} | " + " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "step")
            + f" | eta {eta:.0f}s")
    if args.save_every and (step + 1) % args.save_every == 0 and not last:
        common.save_checkpoint(os.path.join(args.out, "last"), run.model, run.tok_path, run.optimizer,
                               dict(step=step + 1, args=vars(args)))


def finish(run, args):
    """OUT/final with the summary: each training reward and reverse KL averaged over the last 5
    steps, and the last held-out scores."""
    recent = run.history[-5:]
    summary = {k: sum(r[k] for r in recent if k in r) / sum(k in r for r in recent)
               for k in {k for r in recent for k in r if k.startswith(("reward/", "reverse_kl/"))}}
    summary.update({k: v for r in run.history for k, v in r.items() if k.startswith("eval/")})
    common.save_final(args.out, run.model, run.tok_path, dict(step=args.steps, summary=summary))
    return summary


def rl_parser(doc, lr, group_size, min_group=1):
    """A stage's parser (described by the first paragraph of its docstring `doc`) with the arguments
    every RL stage shares (grpo.py, mopd.py, rlhf.py); no abbreviations. min_group: 2 for the stages
    whose advantage is relative to the group (a group of one learns nothing)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
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
    a("--skip_domains", default="", help="domains of --domains whose prompts are drawn by the mix, then "
      "left out (never sampled or trained): the rest are exactly the prompts of a run without this flag")
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
    a("--eval_every", type=common.nonneg_int, default=0,
      help="score on held-out prompts (DATA/eval) every N steps and at the end (0: off)")
    a("--eval_samples", type=common.nonneg_int, default=0, help="held-out score: 0 greedy, k: mean of k at T=1")
    a("--eval_greedy", default="", help="comma-separated domains scored greedily whatever --eval_samples")
    a("--eval_prompts", type=common.pos_int, default=64, help="held-out prompts per domain")
    a("--eval_domains", default="", help="comma-separated domains to score (default: --domains)")
    a("--eval_max_new_tokens", type=common.nonneg_int, default=0, help="held-out answers' cap (0: --max_new_tokens)")
    a("--eval_thinking", default="off", choices=["on", "off"], help="chat mode of the held-out prompts "
      "(math always thinks, as in cascade.py's table)")
    a("--eval_reference", default="", help="a checkpoint: chat's held-out score is the judge's win rate "
      "against its answers (ties 1/2), as in cascade.py's table (default: the judge's mean score)")
    return p
