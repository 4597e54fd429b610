"""
Supervised fine-tuning (SFT): the first stage of the cascade.

What the paper does (Nemotron-Cascade 2, docs/paper.md): one SFT stage on a mix of math, science, chat,
instruction following, safety, agent (SWE, tool calling) and Python reasoning traces, with both
thinking and non-thinking responses; samples packed into sequences of up to 256K tokens; ~1.5
epochs; global batch 64; AdamW (0.9, 0.98), weight decay 0.1; LR 5e-5 -> 5e-6 cosine after 200
warmup steps.

What we keep: all of it, at a smaller scale. The defaults below are the paper's, made for
fine-tuning a pretrained model; a tiny model trained from scratch wants a ~1e-3 peak LR and a short
warmup (recipes/ set them).
- Packing. Conversations are rendered with the chat template (data/chat.py), then packed greedily
  into rows of --seq_len tokens. Each token carries a document id; the model turns these into a
  block-diagonal causal mask with positions restarting at 0 per document, so a packed row computes
  exactly what its conversations would compute one by one (tests/test_sft.py checks it), and little
  compute goes to padding.
- The loss: next-token cross-entropy only where the *next* token was produced by the assistant
  (reasoning, answer, tool calls, the closing <|im_end|>), never on prompts or tool results; averaged
  over the trained tokens of the whole global batch (not per row, not per microbatch), so long and
  short answers weigh the same per token whatever the batch split. Plus the MoE load-balancing loss
  times router_aux_loss_coef.
- Thinking and non-thinking: each conversation says which mode it is in (data.chat infers it from
  the presence of "reasoning"); both go in the same batches.
- AdamW (0.9, 0.98), weight decay on every matrix (projections, experts, router and the embedding)
  and none on the 1-D norm gains. This is Megatron-LM's rule (NVIDIA's trainer): decaying a norm
  gain pulls it towards 0, i.e. it shrinks the activation scale, which is not what regularizing
  means. Linear warmup, then cosine to 10% of the peak (5e-5 -> 5e-6). Gradient clipping at 1.0
  is ours (the paper gives none for SFT).

What we drop, and why:
- 256K-token rows: our models have short contexts; --seq_len sets the row length.
- Sequence/context parallelism: our rows are short.
- DDP's overlap of the gradient all-reduce with the backward: the gradients are summed over ranks
  once per step (common.sync_grads), as in the RL stages, one rule for the global token mean
  everywhere, which at our sizes is worth more than the overlap.
- Repacking every epoch: we pack once (after a seeded shuffle) and shuffle the rows every epoch,
  which keeps the data position a simple (epoch, index) pair for resuming.

Distributed: the global batch (--batch_size rows) is split into equal contiguous slices, one per
rank, each cut into --grad_accum microbatches; every rank holds the packed data and draws the same
seeded permutation per epoch, so N ranks with G microbatches each compute what one process with N*G
microbatches computes (up to float rounding). With --fsdp the weights, gradients and AdamW state
are sharded over the ranks (common.shard). The only randomness is (seed) for the init and (seed,
epoch) for the data order, so a resumed run continues bit-exactly.

    python -m data.build --out runs/data --preset tiny                           # the built-in data
    python sft.py --config configs/tiny.json --data runs/data --out runs/sft     # from scratch, CPU
    python sft.py --init CKPT --data DIR --out runs/sft --device cuda            # from a checkpoint
    torchrun --standalone --nproc_per_node=8 sft.py --init CKPT --data DIR --out runs/sft
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import common
import data
from data.chat import PAD, encode_chat
from model import ModelConfig, Transformer

IGNORE = -100  # label of a position whose next token is not trained (F.cross_entropy's ignore_index)


def build_parser():
    p = argparse.ArgumentParser(
        description="Supervised fine-tuning with packed sequences and an assistant-only loss (the "
        "first stage of the cascade). Resumes from OUT/last when it exists; returns at once when "
        "OUT/final exists.", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="start checkpoint directory (HF layout + tokenizer.json)")
    start.add_argument("--config", help="model config.json to train from scratch (tokenizer from --data)")
    a = p.add_argument
    a("--out", required=True, help="run directory: metrics.jsonl, last/ (resumable), final/")
    a("--data", required=True, help="data directory with tokenizer.json and sft.jsonl")
    a("--sft_file", help="SFT conversations JSONL (default: DATA/sft.jsonl)")
    a("--seed", type=int, default=0, help="seed of the init and of the data order")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="compute dtype (auto: bf16 autocast on CUDA, fp32 on CPU); weights stay fp32")
    a("--steps", type=common.nonneg_int, default=0, help="optimizer steps (0: derive from --epochs)")
    a("--epochs", type=common.pos_float, default=1.5, help="passes over the packed rows if --steps is 0")
    a("--batch_size", type=common.pos_int, default=64, help="global batch, in packed rows")
    a("--seq_len", type=common.pos_int, default=2048, help="tokens per packed row")
    a("--grad_accum", type=common.pos_int, default=1, help="microbatches per rank per step")
    a("--lr", type=common.pos_float, default=5e-5, help="peak learning rate (cosine to 10%% of it)")
    a("--warmup", type=common.nonneg_int, default=200, help="linear warmup steps")
    a("--weight_decay", type=common.nonneg_float, default=0.1, help="AdamW weight decay (matrices only)")
    a("--grad_clip", type=common.nonneg_float, default=1.0, help="max global gradient norm (0: off)")
    a("--save_every", type=common.nonneg_int, default=0, help="write OUT/last every N steps (0: never)")
    a("--fsdp", action="store_true", help="shard weights, gradients and optimizer state "
      "over the ranks (FSDP2) instead of replicating them; no effect on one process")
    a("--log_every", type=common.pos_int, default=10, help="progress line and metrics row every N steps")
    return p

# -----------------------------------------------------------------------------
# packing


def pack(docs, seq_len, pad_id):
    """Pack (ids, mask) conversations, in order, into rows of seq_len tokens: each goes into the
    current row if it fits, else starts a new one (next-fit). A conversation longer than a row is
    cut to seq_len. Returns int64 tensors [R, seq_len] and the number of conversations cut:
      input_ids  the tokens, pad_id after the last document of a row
      doc_ids    0, 1, 2, ... per document within the row; -1 on padding (its own "document")
      labels     the next token of the same document where that token is trained, else IGNORE
    """
    input_ids, doc_ids, labels, truncated = [], [], [], 0  # one list of tokens per row
    for ids, mask in docs:
        if len(ids) > seq_len:
            ids, mask, truncated = ids[:seq_len], mask[:seq_len], truncated + 1
        if not input_ids or len(input_ids[-1]) + len(ids) > seq_len:  # start a new row
            for rows in (input_ids, doc_ids, labels):
                rows.append([])
        doc = doc_ids[-1][-1] + 1 if doc_ids[-1] else 0
        input_ids[-1] += ids
        doc_ids[-1] += [doc] * len(ids)
        # position i is trained to predict token i+1, so it takes token i+1's mask; the last
        # token of a document predicts nothing (the next one belongs to another document)
        labels[-1] += [tok if m else IGNORE for tok, m in zip(ids[1:], mask[1:])] + [IGNORE]

    def padded(rows, value):
        return torch.tensor([row + [value] * (seq_len - len(row)) for row in rows], dtype=torch.long)
    return padded(input_ids, pad_id), padded(doc_ids, -1), padded(labels, IGNORE), truncated


def load_rows(tok, path, seq_len, seed):
    """Read the JSONL, render each conversation with the chat template, shuffle (seeded, so that a
    row mixes domains) and pack -> (input_ids, doc_ids, labels, conversations, truncated)."""
    records = data.load_jsonl(path, kind="sft")
    docs = [encode_chat(tok, r["messages"], r.get("tools")) for r in records]
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    input_ids, doc_ids, labels, truncated = pack([docs[i] for i in order], seq_len, tok.token_to_id(PAD))
    return input_ids, doc_ids, labels, len(docs), truncated


def sft_loss(model, input_ids_B_T, doc_ids_B_T, labels_B_T):
    """-> (sum of the cross-entropy over trained positions, load-balancing aux loss). Only trained
    positions go through the LM head (logits_index): prompts cost no vocabulary projection."""
    labels_N = labels_B_T.flatten()
    index_N = (labels_N != IGNORE).nonzero().squeeze(1)
    logits_N_V, aux = model(input_ids_B_T, doc_ids_B_T=doc_ids_B_T, logits_index=index_N)
    logits_N_V = logits_N_V.to(torch.promote_types(logits_N_V.dtype, torch.float32))  # >= fp32
    return F.cross_entropy(logits_N_V, labels_N[index_N], reduction="sum"), aux


def batch_rows(n_rows, batch_size, seed, epoch, pos):
    """The row indices of the next global batch, continuing the epoch's seeded permutation at `pos`
    (into the next epoch when it runs out) -> (indices, epoch, pos) after the batch."""
    rows = []
    while len(rows) < batch_size:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = order[pos:pos + batch_size - len(rows)]
        rows += take.tolist()
        pos += len(take)
        if pos == n_rows:
            epoch, pos = epoch + 1, 0
    return torch.tensor(rows), epoch, pos


# -----------------------------------------------------------------------------
# training


def main(argv=None):
    args = build_parser().parse_args(argv)
    d = common.init_distributed(args.device)
    rank, world, device = d.rank, d.world_size, d.device
    final, last = os.path.join(args.out, "final"), os.path.join(args.out, "last")
    if (summary := common.finished_summary(args.out)) is not None:  # the stage already ran to the end
        common.print0(f"{final} exists: SFT already done")
        return summary
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch_size {args.batch_size} must be divisible by world size {world} "
                         f"x --grad_accum {args.grad_accum}")
    micro = args.batch_size // (world * args.grad_accum)

    # data: every rank reads and packs the same rows, and holds all of them
    tok_path = os.path.join(args.init or args.data, "tokenizer.json")
    tok = data.load_tokenizer(tok_path)
    sft_file = args.sft_file or os.path.join(args.data, "sft.jsonl")
    input_ids, doc_ids, labels, n_docs, truncated = load_rows(tok, sft_file, args.seq_len, args.seed)
    n_rows, trained_tokens = len(input_ids), (labels != IGNORE).sum().item()
    if trained_tokens == 0:
        raise ValueError(f"{sft_file}: no assistant token to train on in {n_rows} rows of --seq_len "
                         f"{args.seq_len}")
    total = args.steps or math.ceil(args.epochs * n_rows / args.batch_size)
    fill = (doc_ids >= 0).float().mean().item()
    common.print0(f"{n_docs} conversations -> {n_rows} rows of {args.seq_len} tokens "
                  f"({fill:.1%} filled, {trained_tokens:,} trained tokens); "
                  f"{truncated} conversations longer than a row were truncated; {total} steps")

    # model: resume from OUT/last, else start from --init or from scratch (--config)
    resume = common.checkpoint_exists(last)
    fsdp = args.fsdp and world > 1
    load_to = "cpu" if fsdp else device   # FSDP: every rank loads on the CPU, keeps its shard on device
    if resume or args.init:   # (the trainer state is read only when resuming)
        model, state = common.load_checkpoint(last if resume else args.init, load_to)
    else:
        common.set_seed(args.seed)  # the same init on every rank
        model = Transformer(ModelConfig.from_json(args.config)).to(load_to)
    cfg = model.config
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"{tok_path}: tokenizer has {tok.get_vocab_size()} ids but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    if fsdp:
        common.shard(model, device)   # before the optimizer: it must hold the sharded parameters
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.98), fused=device.type == "cuda" and not fsdp)
    step, epoch, pos = 0, 0, 0
    if resume:
        common.check_same_args(last, state, args, ("seed", "batch_size", "seq_len"))
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        if state.get("rows", n_rows) != n_rows or pos > n_rows:   # the data position means nothing
            raise ValueError(f"{last} was written for SFT data of {state.get('rows', f'> {pos}')} packed "
                             f"rows, this run's packs into {n_rows}: the same data, or a fresh --out")
        common.load_optimizer(last, model, opt, state)
        common.print0(f"resuming from {last} at step {step}")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # rows are numbered from 1: a resume after `step` steps drops the rows of later steps
    logger = common.MetricsLogger(os.path.join(args.out, "metrics.jsonl"), drop_from_step=step + 1)

    model.train()
    t_start, first_step, loss, tokens_per_s = time.time(), step, float("nan"), 0.0
    timed_tokens, timed_s = 0, 0.0  # throughput, leaving out the first step (warm-up, compilation)
    while step < total:
        t0 = time.time()
        lr = common.lr_at(step, total, args.warmup, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        rows, epoch, pos = batch_rows(n_rows, args.batch_size, args.seed, epoch, pos)
        # the number of trained tokens in the whole global batch: every rank knows all its rows,
        # so every rank computes the same count without communicating
        n_trained = max(1, (labels[rows] != IGNORE).sum().item())
        mine = rows[rank * micro * args.grad_accum:(rank + 1) * micro * args.grad_accum]
        sums = torch.zeros(2, device=device)  # [sum of CE, sum of aux] on this rank, for logging
        for k in range(args.grad_accum):
            mb = mine[k * micro:(k + 1) * micro]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                ce, aux = sft_loss(model, input_ids[mb].to(device), doc_ids[mb].to(device), labels[mb].to(device))
            # the global token mean, as in every stage (rl.py's docstring): each rank's CE sum over the
            # *global* count, gradients summed over ranks and microbatches; plus the mean aux loss
            loss_k = ce / n_trained + cfg.router_aux_loss_coef * aux / (world * args.grad_accum)
            loss_k.backward()
            sums += torch.stack([ce.detach(), aux.detach().float()])
        common.sync_grads(list(model.parameters()))   # (FSDP: already summed by its backward)
        grad_norm = common.clip_grad_norm(model.parameters(), args.grad_clip or float("inf"),
                                          f"{args.out}: step {step + 1}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        common.all_reduce_sum(sums)  # .item() below waits for the GPU: the timing is honest
        loss, aux_mean = sums[0].item() / n_trained, sums[1].item() / (world * args.grad_accum)
        tokens, dt = (doc_ids[rows] >= 0).sum().item(), time.time() - t0  # non-pad tokens, global
        tokens_per_s = tokens / dt
        if step > first_step + 1:
            timed_tokens, timed_s = timed_tokens + tokens, timed_s + dt
        if step % args.log_every == 0 or step == total:
            eta = (time.time() - t_start) / (step - first_step) * (total - step)
            common.print0(f"step {step}/{total} | loss {loss:.4f} | aux {aux_mean:.3f} | lr {lr:.2e} "
                          f"| grad norm {grad_norm:.2f} | {tokens_per_s:,.0f} tok/s | eta {eta:.0f}s")
            logger.log(dict(step=step, loss=loss, aux_loss=aux_mean, lr=lr, grad_norm=grad_norm.item(),
                            tokens_per_s=tokens_per_s, epoch=step * args.batch_size / n_rows))
        if args.save_every and step % args.save_every == 0 and step < total:
            common.save_checkpoint(last, model, tok_path, opt, dict(
                step=step, epoch=epoch, pos=pos, rows=n_rows, args=vars(args)))

    summary = dict(loss=loss, steps=total, rows=n_rows, conversations=n_docs, truncated=truncated,
                   epochs=total * args.batch_size / n_rows,
                   tokens_per_s=timed_tokens / timed_s if timed_s else tokens_per_s)
    common.save_final(args.out, model, tok_path, dict(step=step, summary=summary))
    common.print0(f"SFT done: {final} | {json.dumps(summary)}")
    return summary


if __name__ == "__main__":
    main()
    common.close_distributed()
