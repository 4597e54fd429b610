"""The rollout engine: every RL stage samples its G responses per prompt through `Engine.generate`.

    engine = Engine(model)        # the training model's own module: no weight copy
    samples = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=256),
                              n=G, seed=step)                 # samples[prompt][g]: Sample

How it works (the mechanism of vLLM, learned from nano-vllm; nothing here is hidden in a global).
This file is the host side, which decides what runs; model_runner.py runs it on the device, so read
this one first and `self.runner`'s methods on trust.

1. Paged KV cache. Attention needs the keys and values of every earlier token. Instead of one
   [max_len, Hkv, D] buffer per sequence (which wastes memory on sequences that stop early and cannot
   share), the runner preallocates ONE pool per layer of fixed-size blocks, [num_blocks, block_size,
   Hkv, D]. A sequence owns a *block table*, the list of its block ids: its token at position p lives
   in block table[p // block_size], row p % block_size, i.e. at the flat *slot* table[p // block_size]
   * block_size + p % block_size. A free list hands out blocks and takes one back when its last
   holder lets go of it (the sequence finished, was preempted, or copied the block on write, 2).
   Block 0 is never handed out: it is the "null block" that padded rows of a CUDA graph write into.

2. Prefix sharing with reference counts. The G samples of one prompt share its prompt: the prompt is
   prefilled once (by sample 0), then samples 1..G-1 are *forked*: they copy sample 0's block table
   and every block's ref_count goes up, and all G sample their first token from the same logits.
   Full prompt blocks stay shared for the rest of generation. The last, partially filled prompt
   block is where every sample writes its first generated token, so it is copied on write: a
   sequence about to write into a block with ref_count > 1 gets a fresh block holding a copy of
   that block's k/v and lets go of the shared one. We chose this over "start each sample's own
   block at the first generated token" because it keeps one rule, slot = f(position), for every
   token of every sequence, so attention and the kernel never need to know about holes; the price
   is at most G - 1 block copies per prompt, nothing next to a prefill. (nano-vllm's Block also
   carries a hash of its tokens to reuse prefixes *across* requests; we only share inside a group,
   where the fork tells us exactly what is shared, so no hash is needed.)

3. Continuous batching. A sequence is just tokens (prompt + response so far) of which the first
   `num_cached` have k/v in the cache. A step feeds each scheduled sequence its uncached tokens
   (a whole prompt, a chunk of one, an environment's tool response, or, in steady state, the one
   token sampled last step) under a cap of max_batch_tokens, and the runner runs them as one
   forward. Sequences join when there is room and leave as soon as they stop, so the batch stays
   full. When the pool runs out, the newest sequence is preempted: its blocks are freed, and it is
   later recomputed from its prompt + tokens so far (the same tokens, so the same result).

4. Sampling and logprobs (`sample`): logits -> / temperature -> top-k -> top-p -> kernels.draw. The
   logprob returned for a token is its log-probability under exactly that truncated, renormalized
   distribution. At temperature 1 with no truncation it equals log_softmax of the training forward's
   logits, up to the train/inference mismatch that GRPO logs and MOPD's weights act on. temperature
   0 is greedy, and since the point mass it samples from has logprob 0, its logprob is that of the
   raw logits instead, the useful number. Same seed, prompts, parameters and engine settings -> same
   samples on the same device (the schedule, hence the order of random draws, is deterministic). A
   sequence stops ("stop") at a stop token or when its text comes to contain a stop string, or at
   max_new_tokens ("length"); the stopping token is kept, with its logprob.

5. Multi-turn environments. When a sequence samples one of `hook_token_ids` (say </tool_call>),
   `env_hook(prompt_index, sample_index, response_ids_so_far)` may return tokens (a tool response)
   to append: they get gen_mask 0 and logprob 0.0, so no loss trains on them, and they are simply
   uncached tokens, prefilled next step like a prompt chunk. None or [] ends the sequence ("stop").
   Responses never exceed max_new_tokens tokens in total (appended tokens count, and are cut to fit).
   A hook token that is also a stop token, or the response's last allowed token, ends the sequence
   without asking env_hook.

6. A policy sharded with FSDP2 (--fsdp) holds 1/W of each weight per rank; generate gathers the
   full weights once, for the whole call (common.full_parameters; so every rank must call it), and
   by default decodes eagerly (FSDP's hooks run in every forward, which a CUDA graph cannot replay).

7. Decode bursts (`decode_burst`, default 16), the optimisation at the end of the class. A step as in
   3 costs the host a few microseconds per sequence (schedule, tables, reading the sampled tokens
   back, appending them): at batch 2048, several milliseconds, far more than the GPU needs for the
   step. So when every running sequence just decodes and no waiting one could join, the engine
   reserves blocks for the next k tokens of each, has the runner run k steps back to back on the
   device, and reads the k x S tokens back once. Each sequence keeps its tokens up to its first
   stop, tool call or max_new_tokens; one that ended early decoded junk into its own blocks for the
   rest of the burst. On a GPU (`overlap`), the engine launches the next burst before it reads the
   last, as if every sequence went on, so the host appends tokens while the GPU computes the next
   ones; the pipeline drains when a row ended or called a tool, a waiting sequence could join, or
   the pool would have to preempt. Greedy samples are the same for any decode_burst; sampled ones
   draw their random numbers in another order, so they differ, with the same distribution.
"""
import gc
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from common import full_parameters, is_sharded
from kernels import draw, kernel_fits
from model_runner import DecodeState, ModelRunner


@dataclass
class SamplingParams:
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0             # keep the smallest top set with probability >= top_p
    top_k: int = 0                 # 0 = off; else keep the tokens whose logit >= the k-th largest
    max_new_tokens: int = 256      # cap on len(token_ids), generated + appended
    stop_token_ids: tuple = ()     # e.g. <|im_end|>, EOS (data.chat.stop_ids)
    stop_strings: tuple = ()       # stop once the response's text contains one (generate's `decode`)
    hook_token_ids: tuple = ()     # e.g. </tool_call>: pause; env_hook's tokens are appended (none: stop)


@dataclass
class Sample:
    prompt_ids: list[int]
    token_ids: list[int]       # everything after the prompt: generated + env-appended
    logprobs: list[float]      # per token of token_ids, under the distribution sampled from; 0.0 for appended
    gen_mask: list[int]        # 1 = generated by the model, 0 = appended by the environment
    finish_reason: str         # "stop" | "length"


@dataclass(eq=False)   # compared by identity: two samples may hold equal tokens
class Sequence:
    prompt_index: int
    sample_index: int
    row: int                           # this sequence's row of Engine.tables (its block table mirror)
    tokens: list[int]                  # prompt + response so far
    num_prompt: int
    num_cached: int = 0                # tokens[:num_cached] have their k/v in the pool
    block_table: list[int] = field(default_factory=list)
    children: list = field(default_factory=list)   # samples forked from this one once the prompt is cached
    logprobs: list[float] = field(default_factory=list)
    gen_mask: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class BlockAllocator:
    """A free list of block ids with a reference count per block. Block 0 is the null block."""

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks - 1, 0, -1))   # pop() hands out low ids first
        self.ref_count = [0] * num_blocks

    def allocate(self) -> int:
        block = self.free.pop()
        self.ref_count[block] = 1
        return block

    def share(self, block: int):
        self.ref_count[block] += 1

    def release(self, block: int):
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free.append(block)


def sample(logits_R_V: Tensor, params: SamplingParams, generator: torch.Generator,
           philox_2: Tensor | None = None):
    """One token per row, and its logprob under the distribution it was drawn from (docstring, 4).
    The draw is kernels.draw: torch.multinomial with `generator`, or, given philox_2 on a GPU, one
    Triton kernel whose random key lives on the device (kernels/sampling.py)."""
    temperature = params.temperature
    if temperature > 0 and (params.top_k > 0 or params.top_p < 1.0):
        logits = logits_R_V.float() / temperature
        if params.top_k > 0:
            kth_R1 = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_R1, float("-inf"))
        if params.top_p < 1.0:
            probs_sorted, order = logits.softmax(-1).sort(-1, descending=True)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            drop_sorted = probs_sorted.cumsum(-1) - probs_sorted >= params.top_p
            logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
        logits_R_V, temperature = logits, 1.0   # (already divided)
    return draw(logits_R_V, temperature, generator, philox_2)


def ends_in_stop_string(response_ids: list[int], params: SamplingParams, decode) -> bool:
    """Does the last token complete one of params.stop_strings, i.e. does one occur in the text and
    end inside that token's text? Occurrences already there before it (say, in a tool response the
    environment appended) do not count. Only the response's tail is decoded: a token is at least
    one byte and a character at most four, so the last 4 * len + 1 tokens hold any occurrence."""
    tail = response_ids[-(4 * max(map(len, params.stop_strings)) + 1):]
    text, before = decode(tail), len(decode(tail[:-1]))
    return any(s in text[max(0, before - len(s) + 1):] for s in params.stop_strings)


class Engine:
    """block_size: tokens per KV block. num_blocks: pool size (None: what the largest request so far
    needed, on a GPU at most half the free memory). max_batch_tokens: cap on the tokens of one step.
    max_seqs: cap on running sequences. cuda_graphs: capture decode steps (default: on a GPU, unless
    the model is FSDP-sharded (docstring, 6) or the Triton attention kernel does not take the block
    size (kernels/paged_attention.kernel_fits); never under autocast: ModelRunner.start).
    decode_burst, overlap: docstring, 7 (overlap's default: on a GPU). `stats`: the last generate's."""

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None,
                 max_batch_tokens: int = 8192, max_seqs: int = 512, cuda_graphs: bool | None = None,
                 decode_burst: int = 16, overlap: bool | None = None):
        if decode_burst < 1:
            raise ValueError(f"rollout.py: decode_burst={decode_burst} must be >= 1 (1: a host sync per step)")
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        self.max_batch_tokens, self.max_seqs, self.decode_burst = max_batch_tokens, max_seqs, decode_burst
        self.max_len = model.config.max_position_embeddings
        device = next(model.parameters()).device
        if cuda_graphs is None:   # (with the torch attention a graph's step would gather tables as
            # wide as the longest sequence may need, at every step)
            cuda_graphs = device.type == "cuda" and not is_sharded(model) and kernel_fits(block_size)
        self.runner = ModelRunner(model, block_size, cuda_graphs, max_graph=max_seqs)
        # a CPU runs the steps itself: there is nothing to overlap, and the junk rows would only cost
        self.overlap = device.type == "cuda" if overlap is None else overlap
        self.stats = {}

    def release(self):
        """Give the KV pool and the CUDA graphs back to the allocator (e.g. before a training phase)."""
        self.runner.release()

    # ---- the pool's blocks

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _reserve(self, seq: Sequence, num_new: int, alloc: BlockAllocator, start: int | None = None) -> bool:
        """Make room for k/v of tokens [start, start + num_new) (start: num_cached unless given);
        False if the pool is full."""
        table, bs = seq.block_table, self.block_size
        start = seq.num_cached if start is None else start
        first = start // bs   # the block the first new token is written to
        grow = self._blocks_for(start + num_new) - len(table)
        copy = first < len(table) and alloc.ref_count[table[first]] > 1
        if grow <= 0 and not copy:     # most decode steps: the token fits in a block of its own
            return True
        if grow + copy > len(alloc.free):
            return False
        if copy:   # copy-on-write of a block shared with the other samples of the prompt
            shared, own = table[first], alloc.allocate()
            self.runner.copy_block(shared, own)
            alloc.release(shared)
            table[first] = self.tables[seq.row, first] = own
        if grow > 0:
            new = [alloc.allocate() for _ in range(grow)]
            self.tables[seq.row, len(table):len(table) + grow] = new
            table += new
        return True

    def _free(self, seq: Sequence, alloc: BlockAllocator):
        for block in seq.block_table:
            alloc.release(block)
        seq.block_table, seq.num_cached = [], 0

    def _tables(self, seqs: list) -> np.ndarray:
        """The sequences' block tables, [S, M] (M: the longest; shorter rows padded with stale ids)."""
        return self.tables[[seq.row for seq in seqs], :max(len(seq.block_table) for seq in seqs)]

    # ---- scheduling: which tokens of which sequences run this step

    def _reserve_or_preempt(self, i: int, num_new: int, waiting: deque, running: list,
                            alloc: BlockAllocator) -> bool:
        """Reserve blocks for running[i]'s next num_new tokens, preempting the newest sequences
        (freed, recomputed later) while the pool is full. False if running[i] itself was preempted."""
        seq = running[i]
        while not self._reserve(seq, num_new, alloc):
            victim = running.pop()
            self._free(victim, alloc)
            waiting.appendleft(victim)
            self.stats["preemptions"] += 1
            if victim is seq:
                return False
        return True

    def _schedule(self, waiting: deque, running: list, alloc: BlockAllocator) -> list:
        batch, budget = [], self.max_batch_tokens
        i = 0
        while i < len(running) and budget > 0:   # oldest first: they hold blocks, let them finish
            seq = running[i]
            num_new = min(len(seq.tokens) - seq.num_cached, budget)
            if self._reserve_or_preempt(i, num_new, waiting, running, alloc):
                batch.append((seq, num_new))
                budget -= num_new
            i += 1
        while waiting and budget > 0 and len(running) + 1 + len(waiting[0].children) <= self.max_seqs:
            seq = waiting[0]
            num_new = min(len(seq.tokens) - seq.num_cached, budget)
            if not self._reserve(seq, num_new, alloc):
                break
            running.append(waiting.popleft())
            batch.append((seq, num_new))
            budget -= num_new
        return batch

    # ---- the public entry point

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1, seed: int = 0,
                 env_hook=None, decode=None) -> list[list[Sample]]:
        """G = n samples per prompt; returns samples[prompt_index][sample_index]. For a policy sharded
        with FSDP this is a collective (the weights are gathered): every rank calls it, even with
        no prompts."""
        if not prompts:
            with full_parameters(self.model):   # (the gather the other ranks wait for)
                return []
        if n < 1 or n > self.max_seqs:
            raise ValueError(f"rollout.py: n={n} must be in [1, max_seqs={self.max_seqs}]")
        if params.max_new_tokens < 1 or params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
            raise ValueError(f"rollout.py: bad {params}: need max_new_tokens >= 1, temperature >= 0, "
                             "0 < top_p <= 1, top_k >= 0")
        if params.stop_strings and (decode is None or not all(params.stop_strings)):
            raise ValueError("rollout.py: stop_strings need generate(..., decode=tokenizer's ids -> text), "
                             f"and must not be empty: {params.stop_strings!r}")
        if empty := [i for i, p in enumerate(prompts) if not p]:
            raise ValueError(f"rollout.py: empty prompt at index {empty[0]}")
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if longest > self.max_len:
            raise ValueError(f"rollout.py: prompt + max_new_tokens = {longest} > the model's "
                             f"max_position_embeddings = {self.max_len}")
        need = self._blocks_for(longest) * min(len(prompts) * n, self.max_seqs) + 1
        num_blocks = self.runner.prepare(self.num_blocks or need, self.num_blocks is not None)
        if num_blocks - 1 < self._blocks_for(longest):
            raise ValueError(f"rollout.py: a pool of {num_blocks} blocks of {self.block_size} "
                             f"tokens cannot hold one sequence of {longest} tokens")
        was_training, gc_was_on = self.model.training, gc.isenabled()
        self.model.eval()
        # No cyclic garbage collection while generating: the engine makes no reference cycles, but
        # its thousands of growing token lists set off collections that walk all of them (at batch
        # 2048: ~68 per call, and now and then a full one of ~170 ms; bench/RESULTS.md).
        gc.disable()
        try:
            with full_parameters(self.model):
                return self._generate(prompts, params, n, seed, env_hook, decode, longest, num_blocks)
        finally:
            self.model.train(was_training)
            if gc_was_on:
                gc.enable()

    def _generate(self, prompts, params, n, seed, env_hook, decode, longest, num_blocks) -> list[list[Sample]]:
        alloc = self.alloc = BlockAllocator(num_blocks)   # kept for inspection (tests)
        generator = torch.Generator(device=self.runner.device).manual_seed(seed)   # torch's draws
        self.runner.seed(seed)                                                      # the kernel's
        sampler = lambda logits_R_V: sample(logits_R_V, params, generator, self.runner.philox_2)
        self.stats = dict(steps=0, forward_tokens=0, preemptions=0, graph_steps=0, peak_blocks=0, bursts=0,
                          ahead=0)
        groups = [[Sequence(i, j, i * n + j, list(p), len(p)) for j in range(n)]
                  for i, p in enumerate(prompts)]
        # every block table mirrored in one int32 array: a step gathers its rows in one indexing op
        self.tables = np.zeros((len(prompts) * n, self._blocks_for(longest)), dtype=np.int32)
        for group in groups:
            group[0].children = group[1:]
        accept = lambda seq, token, logprob: self._accept(seq, token, logprob, params, env_hook, decode, alloc)
        waiting, running, pending = deque(group[0] for group in groups), [], None
        while waiting or running or pending:
            if pending is None and not self._can_burst(waiting, running, alloc):
                self._step(waiting, running, alloc, sampler, accept)   # the mechanism: one step, one sync
            elif pending is None:   # the optimisation (the end of this class): k steps, one sync
                pending = self._burst(waiting, running, alloc, params, sampler)
            else:
                # the next burst goes to the device before the host reads this one: the host's work
                # on these tokens overlaps the GPU's on the next ones (docstring, 7)
                follow = self._follow(pending, waiting, running, alloc, params, sampler)
                all_live = self._take(pending, params, accept)
                if follow is not None:
                    follow.all_live = all_live
                pending = follow
            self.stats["peak_blocks"] = max(self.stats["peak_blocks"], len(alloc.ref_count) - 1 - len(alloc.free))
            running[:] = [seq for seq in running if seq.finish_reason is None]
        assert len(alloc.free) == len(alloc.ref_count) - 1, "rollout.py: blocks leaked"
        assert all(s.finish_reason for group in groups for s in group), "rollout.py: a sample never ran"
        return [[Sample(s.tokens[:s.num_prompt], s.tokens[s.num_prompt:], s.logprobs, s.gen_mask,
                        s.finish_reason) for s in group] for group in groups]

    def _step(self, waiting, running, alloc, sampler, accept):
        """One scheduled step: prefill chunks and decodes in one forward, one token sampled for every
        sequence whose tokens are all cached after it (and for the samples forked from it)."""
        batch = self._schedule(waiting, running, alloc)
        if not batch:
            raise RuntimeError("rollout.py: nothing fits in a step (pool or max_batch_tokens too small)")
        self.stats["steps"] += 1
        batch.sort(key=lambda e: e[1] > 1)   # single-token sequences first: the decode path
        # sequences whose chunk reaches the end of their tokens sample one token from its logits
        last, ready, end = [], [], 0
        for seq, num_new in batch:
            end += num_new
            if seq.num_cached + num_new == len(seq.tokens):
                last.append(end - 1)
                ready.append(seq)
        ids = [t for seq, num_new in batch for t in seq.tokens[seq.num_cached:seq.num_cached + num_new]]
        self.stats["forward_tokens"] += len(ids)
        logits_R_V = self.runner.forward(ids, [num_new for _, num_new in batch],
                                         [seq.num_cached for seq, _ in batch],
                                         self._tables([seq for seq, _ in batch]), last)
        for seq, num_new in batch:
            seq.num_cached += num_new
        rows, seqs = [], []
        for r, seq in enumerate(ready):
            if seq.children:   # prompt cached: fork the other samples onto its blocks
                for child in seq.children:
                    for block in seq.block_table:
                        alloc.share(block)
                    child.block_table, child.num_cached = list(seq.block_table), seq.num_cached
                    self.tables[child.row] = self.tables[seq.row]
                at = running.index(seq) + 1
                running[at:at] = seq.children
                rows += [r] * len(seq.children)
                seqs += seq.children
                seq.children = []
            rows.append(r)
            seqs.append(seq)
        tokens_R, logprobs_R = sampler(logits_R_V[rows])
        for seq, token, logprob in zip(seqs, tokens_R.tolist(), logprobs_R.tolist()):
            accept(seq, token, logprob)

    def _accept(self, seq, token, logprob, params, env_hook, decode, alloc):
        """Append a sampled token; decide whether the sequence ends (stop token or string, length), or
        ask the environment for tokens to append after a hook token."""
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        seq.gen_mask.append(1)
        num_response = len(seq.tokens) - seq.num_prompt
        if token in params.stop_token_ids or params.stop_strings and ends_in_stop_string(
                seq.tokens[seq.num_prompt:], params, decode):
            seq.finish_reason = "stop"
        elif num_response >= params.max_new_tokens:
            seq.finish_reason = "length"
        elif token in params.hook_token_ids:
            extra = env_hook(seq.prompt_index, seq.sample_index, seq.tokens[seq.num_prompt:]) \
                if env_hook else None
            if not extra:
                seq.finish_reason = "stop"
            else:
                extra = list(extra)[:params.max_new_tokens - num_response]
                seq.tokens += extra
                seq.logprobs += [0.0] * len(extra)
                seq.gen_mask += [0] * len(extra)
                if len(seq.tokens) - seq.num_prompt >= params.max_new_tokens:
                    seq.finish_reason = "length"
        if seq.finish_reason:
            self._free(seq, alloc)

    # ==== the optimisation on top of the mechanism: decode bursts (docstring, 7) =================
    # Everything above is the engine, complete: with every step taken by _step it generates the
    # same greedy samples. Everything below only makes it faster (on the device: model_runner.py, 3, 4).

    def _can_burst(self, waiting: deque, running: list, alloc: BlockAllocator) -> bool:
        """Every running sequence decodes (one uncached token, and no samples left to fork: _step
        forks them from the prompt's logits) and no waiting one could join now (a seat, a token of
        the step's budget and the blocks of its prompt): nothing for the host to decide."""
        if not running or len(running) > self.max_batch_tokens:
            return False
        if any(len(seq.tokens) - seq.num_cached != 1 or seq.children for seq in running):
            return False
        if not waiting:
            return True
        seats = len(running) + 1 + len(waiting[0].children) <= self.max_seqs
        budget = len(running) < self.max_batch_tokens
        return not (seats and budget and self._blocks_for(len(waiting[0].tokens)) <= len(alloc.free))

    def _burst(self, waiting: deque, running: list, alloc: BlockAllocator, params: SamplingParams,
               sampler) -> "Burst | None":
        """Up to decode_burst decode steps of the running sequences, launched on the device and not
        waited for (_take reads them). A sequence that stops (or calls a tool) within the burst
        decodes junk until its end into its own blocks, at positions its attention never reads
        before they are rewritten."""
        k, num_new = self._plan(running, [seq.num_cached for seq in running], params)
        i = 0
        while i < len(running):   # blocks for the whole burst, up front (preemption pops the newest)
            i += self._reserve_or_preempt(i, num_new[i], waiting, running, alloc)
        if not running:
            return None
        seqs = list(running)
        # per row: the token to feed, its position, and the last position it may ever feed (the
        # response's last token is sampled, never fed)
        inputs_3_S = np.array([[seq.tokens[-1] for seq in seqs], [seq.num_cached for seq in seqs],
                               [seq.num_prompt + params.max_new_tokens - 2 for seq in seqs]], dtype=np.int64)
        # what `sample` reads of params: a CUDA graph captured with one setting serves only that one
        st = self.runner.start(inputs_3_S, self.tables.shape[1], self.decode_burst, sampler,
                               (params.temperature, params.top_k, params.top_p))
        return self._launch(Burst(seqs, [seq.num_cached for seq in seqs], k, st), sampler)

    def _follow(self, burst: "Burst", waiting: deque, running: list, alloc: BlockAllocator,
                params: SamplingParams, sampler) -> "Burst | None":
        """The next burst of the same sequences, launched before the host has read `burst`, from the
        inputs burst leaves on the device, as if every sequence took all its tokens. None when a
        sequence ended or diverged before `burst` started, a waiting one could join, the responses
        are done, or the pool would have to preempt."""
        if not (self.overlap and burst.all_live and running == burst.seqs
                and self._can_burst(waiting, running, alloc)):
            return None
        starts = [start + burst.k for start in burst.starts]
        k, num_new = self._plan(burst.seqs, starts, params)
        if k < 1:
            return None
        for seq, start, n in zip(burst.seqs, starts, num_new):
            if n > 0 and not self._reserve(seq, n, alloc, start):
                return None   # (blocks already reserved stay with their sequences: used or freed later)
        self.stats["ahead"] += 1
        return self._launch(Burst(burst.seqs, starts, k, burst.st), sampler)

    def _launch(self, burst: "Burst", sampler) -> "Burst":
        """Hand the burst to the runner, with the block tables of its sequences."""
        burst.tokens, burst.logprobs, burst.done = self.runner.launch(burst.st, burst.k, self._tables(burst.seqs),
                                                                      sampler)
        self.stats["bursts"] += 1
        self.stats["steps"] += burst.k
        self.stats["graph_steps"] += burst.k if burst.st.graph is not None else 0
        self.stats["forward_tokens"] += burst.k * len(burst.seqs)
        return burst

    def _plan(self, seqs: list, starts: list[int], params: SamplingParams) -> tuple[int, list[int]]:
        """A burst's k, and how many positions each sequence feeds in it. A sequence that feeds
        position `start` next has a response of start + 1 - num_prompt tokens, so it has
        max_new_tokens minus that still to sample (and feeds one position per token but its last).
        k: the most of those, at most decode_burst, so the tail of a rollout wastes no steps."""
        to_go = [params.max_new_tokens - (start + 1 - seq.num_prompt) for seq, start in zip(seqs, starts)]
        k = min(self.decode_burst, max(to_go))
        return k, [min(k, n) for n in to_go]

    def _take(self, burst: "Burst", params: SamplingParams, accept) -> bool:
        """Wait for a burst's tokens; each sequence takes them up to the first that ends it, calls a
        tool or reaches max_new_tokens, and drops the rest. A sequence that ended or diverged before
        the burst began (it ran as junk; see _follow) takes none. -> every sequence took all k and
        goes on decoding."""
        if burst.done is not None:
            burst.done.synchronize()
        # (numpy: its tolist is several times faster than a tensor's)
        tokens_S_k, logprobs_S_k = burst.tokens.numpy().T.tolist(), burst.logprobs.numpy().T.tolist()
        events = set(params.stop_token_ids) | set(params.hook_token_ids)
        k, all_live = burst.k, True
        for seq, start, tokens, logprobs in zip(burst.seqs, burst.starts, tokens_S_k, logprobs_S_k):
            if seq.finish_reason or seq.num_cached != start or len(seq.tokens) != start + 1:
                all_live = False
                continue
            take = min(k, params.max_new_tokens - (len(seq.tokens) - seq.num_prompt))
            if not params.stop_strings and events.isdisjoint(tokens[:take]):
                seq.tokens += tokens[:take - 1]    # the common case: no stop, no tool call
                seq.logprobs += logprobs[:take - 1]
                seq.gen_mask += [1] * (take - 1)
                seq.num_cached += take
                accept(seq, tokens[take - 1], logprobs[take - 1])   # (which may end it at max_new_tokens)
            else:
                for token, logprob in zip(tokens, logprobs):
                    seq.num_cached += 1            # the token fed at this step
                    accept(seq, token, logprob)
                    if seq.finish_reason or len(seq.tokens) - seq.num_cached > 1:
                        break                      # ended, or a tool's reply appended: later tokens are void
            all_live = all_live and not seq.finish_reason and len(seq.tokens) - seq.num_cached == 1
        return all_live


@dataclass(eq=False)
class Burst:
    """k decode steps of `seqs` launched on the device (ModelRunner.launch). The host reads `tokens`
    and `logprobs` ([k, S] host tensors, filled once `done` has happened) later, in _take."""
    seqs: list
    starts: list[int]      # each sequence's num_cached when the burst began (its first fed position)
    k: int
    st: DecodeState        # the device buffers its steps run on
    tokens: Tensor | None = None
    logprobs: Tensor | None = None
    done: object = None    # a torch.cuda.Event recorded after the copy back, on a GPU
    all_live: bool = True  # every sequence was still decoding when the burst before it was read
