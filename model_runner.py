"""The device side of the rollout engine: the KV pool, and the model run over it.

rollout.Engine decides what each step runs: which tokens of which sequences, and which blocks of
the pool hold each sequence's k/v (its block table; rollout.py's docstring, 1). A ModelRunner runs
that on the model's device. It knows nothing of sequences or prompts: it gets token ids, positions
and block tables, and gives back logits, or the tokens a `sampler` function it is handed drew.
(vLLM and nano-vllm split their engines the same way, into a scheduler and a model runner.)

1. The pool: k_cache and v_cache, each [layers, num_blocks, block_size, Hkv, D], zeros (a masked-out
   position still multiplies its 0 weight with V, and NaN * 0 = NaN), sized by `prepare`.

2. A scheduled step (`forward`): the N new tokens of S sequences, flattened into one [1, N] row with
   per-token positions, single-token sequences first. The model runs with an explicit `attention`
   callable (`_attention`, called by every layer with q/k already normed and RoPE'd) that stores
   the step's k/v in the pool and attends each token over its own sequence's cached prefix:
   single-token sequences through kernels/paged_attention.py, which also writes their k/v (Triton
   on the GPU), multi-token chunks written through their slots, then padded into one masked SDPA
   call over their context, gathered through the block tables (model.causal_attention).

3. Decode bursts (rollout.py's docstring, 7). `decode_step` runs one decode step wholly on the
   device, from and into the buffers of a `DecodeState`, so k of them run back to back with nothing
   from the host. `start` fills a burst's buffers, `launch` enqueues its steps and the copy of its
   tokens back, all asynchronous (from pinned host memory): the host runs ahead of the GPU until it
   waits on the event `done`.

4. CUDA graphs (GPU only). A decode step does the same work for any batch of the same size, so the
   whole of it is captured once per padded batch size (1, 2, 4, 8, ...) and sampling setting, and
   replayed: one launch instead of a hundred and more small kernels. The sampler can live in a
   graph because on the GPU its draw is one Triton kernel whose random key, `philox_2` = [seed,
   step], is read from device memory and moved on inside the graph (kernels/sampling.py); top-k and
   top-p, when set, are plain torch ops before it, captured with it. Graphs stay valid while the
   parameters keep their storage (optimizers update in place); if parameters are reallocated, we
   capture again. A forward that cannot be captured is an error (`_capture` says why).
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from kernels import paged_decode_attention
from model import causal_attention


@dataclass
class StepMeta:
    """Everything the attention callable needs to know about one step's N flattened tokens."""
    num_decode: int                # tokens [0, num_decode) are single-token sequences (decode path)
    block_tables_S_M: Tensor       # their block tables (padding: stale but valid block ids)
    positions_S: Tensor            # their positions (the kernel finds their slots in the tables)
    # multi-token chunks, padded to P sequences x T new tokens x C context tokens (None if none)
    slots_chunks: Tensor | None = None  # pool slot each chunk token's k/v goes to (tokens num_decode..N)
    rows_P_T: Tensor | None = None      # index into N of each chunk token (padding: any valid index)
    valid_P_T: Tensor | None = None     # real (not padding) chunk tokens
    slots_P_C: Tensor | None = None     # pool slots of each chunk's context, in position order
    mask_P_T_C: Tensor | None = None    # causal: token at position p sees context positions <= p


@dataclass(eq=False)
class DecodeState:
    """The device buffers the decode steps of a burst run on, n rows (a graph's: padded)."""
    inputs_3_n: Tensor     # per row: the token to feed, its position, its last position (one copy fills all)
    tables_n_M: Tensor     # int32 block tables; the steps read the first `width` columns
    width: int
    tokens_k_n: Tensor     # row j: the tokens sampled at step j of the burst
    logprobs_k_n: Tensor
    j: Tensor              # [1]: the step of the burst that runs next
    graph: object = None   # the CUDA graph that runs a step on these buffers, or None: run eagerly


class ModelRunner:
    """Runs the model for rollout.Engine, over a paged KV pool. cuda_graphs: capture decode steps
    (docstring, 4), for bursts of up to max_graph sequences (larger ones run eagerly)."""

    def __init__(self, model, block_size: int, cuda_graphs: bool, max_graph: int = 512):
        cfg = model.config
        self.model, self.block_size = model, block_size
        self.use_graphs, self.max_graph = cuda_graphs, max_graph
        self.shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        self.max_blocks = -(-cfg.max_position_embeddings // block_size)   # of the longest sequence
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.k_cache = self.v_cache = None
        self.graphs, self.graph_pool, self.graph_key = {}, None, None
        # the Triton sampler's random key [seed, step] (kernels/sampling.py), at one fixed address
        # for the CUDA graphs to read
        self.philox_2 = torch.zeros(2, dtype=torch.long, device=self.device)

    def release(self):   # (Engine.release)
        self.k_cache = self.v_cache = None
        self.graphs, self.graph_pool = {}, None

    # ---- the pool

    def prepare(self, num_blocks: int, fixed: bool) -> int:
        """Before a generate: a pool of num_blocks blocks (on a GPU and unless `fixed`, at most half
        the free memory, counting our current pool as free), and graphs dropped if the parameters moved.
        -> the pool's size in blocks."""
        L, Hkv, D = self.shape
        if not fixed and self.device.type == "cuda":
            bytes_per_block = 2 * L * self.block_size * Hkv * D * self.dtype.itemsize
            free = (torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device)
                    - torch.cuda.memory_allocated(self.device)
                    + (2 * self.k_cache.nbytes if self.k_cache is not None else 0))
            num_blocks = min(num_blocks, free // 2 // bytes_per_block)
        if self.k_cache is None or self.k_cache.shape[1] < num_blocks:
            self.release()
            self.k_cache = torch.zeros(L, num_blocks, self.block_size, Hkv, D, dtype=self.dtype,
                                       device=self.device)
            self.v_cache = torch.zeros_like(self.k_cache)
        if self.use_graphs:
            key = [p.data_ptr() for p in self.model.parameters()]
            if key != self.graph_key:   # parameters reallocated since capture: graphs read stale memory
                self.graphs, self.graph_pool, self.graph_key = {}, None, key
        return self.k_cache.shape[1]

    def seed(self, seed: int):
        """Restart the Triton sampler's random numbers: its key is [seed, step], and step counts draws."""
        self.philox_2.copy_(torch.tensor([seed % 2**32, 0]))

    def copy_block(self, src: int, dst: int):
        """Copy-on-write of a shared block (rollout.py's docstring, 2): all layers, one indexed copy."""
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]

    # ---- a scheduled step

    def _tensor(self, ints) -> Tensor:
        """Ints as an int64 tensor on the device (via numpy: ~5x faster than torch.tensor from a list)."""
        return torch.from_numpy(np.asarray(ints, dtype=np.int64)).to(self.device)

    def _slots(self, tables_S_M: Tensor, seq: Tensor, pos: Tensor) -> Tensor:
        """The pool slot of position `pos` of sequence `seq` (broadcast together): the block in its
        table at pos // block_size, row pos % block_size (rollout.py's docstring, 1)."""
        bs = self.block_size
        return tables_S_M[seq, pos // bs].long() * bs + pos % bs

    def forward(self, ids: list[int], num_new: list[int], cached: list[int], tables_S_M: np.ndarray,
                last: list[int]) -> Tensor:
        """One step (docstring, 2): sequence s feeds num_new[s] tokens of `ids` (in sequence order,
        single tokens first) at positions cached[s], cached[s] + 1, ...; its block table is row s of
        tables_S_M. -> the logits at the flat token indices `last`."""
        dev, N, S = self.device, len(ids), len(num_new)
        num_decode = sum(n == 1 for n in num_new)
        tables_S_M = torch.from_numpy(tables_S_M).to(dev)
        num_new_S, cached_S = self._tensor(num_new), self._tensor(cached)
        # per token: its sequence and its position (the decode tokens come first, one per sequence)
        seq_N = torch.repeat_interleave(torch.arange(S, device=dev), num_new_S, output_size=N)
        start_S = num_new_S.cumsum(0) - num_new_S
        pos_N = torch.arange(N, device=dev) - start_S[seq_N] + cached_S[seq_N]
        meta = StepMeta(num_decode, tables_S_M[:num_decode], cached_S[:num_decode])
        if num_decode < S:   # chunks: their slots; pad to [P, T] queries over [P, C] context positions
            c = slice(num_decode, N)
            meta.slots_chunks = self._slots(tables_S_M, seq_N[c], pos_N[c])
            p = slice(num_decode, S)
            T, C = max(num_new[p]), max(n + k for n, k in zip(num_new[p], cached[p]))
            t_T, c_C = torch.arange(T, device=dev), torch.arange(C, device=dev)
            meta.valid_P_T = t_T < num_new_S[p, None]
            meta.rows_P_T = torch.where(meta.valid_P_T, start_S[p, None] + t_T, 0)
            # a padding token pretends to sit at position 0 so that its softmax row is not empty
            pos_P_T = torch.where(meta.valid_P_T, cached_S[p, None] + t_T, 0)
            meta.mask_P_T_C = c_C <= pos_P_T[:, :, None]
            meta.slots_P_C = self._slots(tables_S_M, torch.arange(num_decode, S, device=dev)[:, None], c_C)
        logits, _ = self.model(self._tensor(ids)[None], pos_N[None], attention=self._attention(meta),
                               logits_index=self._tensor(last))
        return logits

    def _attention(self, meta: StepMeta):
        """The callable the model calls in every layer, with q/k already normed and RoPE'd."""
        def attention(layer: int, q_1_Hq_N_D: Tensor, k_1_Hkv_N_D: Tensor, v_1_Hkv_N_D: Tensor) -> Tensor:
            q_N_Hq_D, k_N_Hkv_D, v_N_Hkv_D = (t[0].transpose(0, 1)
                                              for t in (q_1_Hq_N_D, k_1_Hkv_N_D, v_1_Hkv_N_D))
            k_pool, v_pool = self.k_cache[layer], self.v_cache[layer]     # [num_blocks, block_size, Hkv, D]
            S = meta.num_decode   # (here S counts the single-token sequences only)
            # single-token sequences: their k/v written to their slots and attended in one call
            decoded_S_Hq_D = paged_decode_attention(
                q_N_Hq_D[:S], k_N_Hkv_D[:S], v_N_Hkv_D[:S], k_pool, v_pool, meta.block_tables_S_M,
                meta.positions_S).to(q_N_Hq_D.dtype) if S else None
            if meta.rows_P_T is None:   # decode only (every CUDA-graph step): nothing to merge
                return decoded_S_Hq_D.transpose(0, 1)[None]
            # chunks: their k/v into the pool, then each token attends over its gathered context
            k_slots, v_slots = k_pool.flatten(0, 1), v_pool.flatten(0, 1)  # views: [num_slots, Hkv, D]
            k_slots.index_copy_(0, meta.slots_chunks, k_N_Hkv_D[S:].to(k_slots.dtype))
            v_slots.index_copy_(0, meta.slots_chunks, v_N_Hkv_D[S:].to(v_slots.dtype))
            out_N_Hq_D = torch.empty_like(q_N_Hq_D)
            if S:
                out_N_Hq_D[:S] = decoded_S_Hq_D
            q_P_Hq_T_D = q_N_Hq_D[meta.rows_P_T].transpose(1, 2)
            k_P_Hkv_C_D, v_P_Hkv_C_D = (t[meta.slots_P_C].transpose(1, 2) for t in (k_slots, v_slots))
            out = causal_attention(q_P_Hq_T_D, k_P_Hkv_C_D, v_P_Hkv_C_D, meta.mask_P_T_C[:, None])
            # (.to: under autocast q may be fp32 while SDPA's output is bf16)
            out_N_Hq_D[meta.rows_P_T[meta.valid_P_T]] = out.transpose(1, 2)[meta.valid_P_T].to(out_N_Hq_D.dtype)
            return out_N_Hq_D.transpose(0, 1)[None]
        return attention

    # ==== the optimisation on top: decode bursts on the device (docstring, 3; rollout.py's 7) =====
    # The engine's mechanism needs only the pool and `forward` above.

    def new_state(self, n: int, width: int, steps: int) -> DecodeState:
        """Zeroed buffers for n rows with block tables up to `width` wide and outputs for `steps`
        steps. Zeros feed token 0 at position 0 through block 0: a padding row writes the null block."""
        dev = self.device
        return DecodeState(
            inputs_3_n=torch.zeros(3, n, dtype=torch.long, device=dev),
            tables_n_M=torch.zeros(n, width, dtype=torch.int32, device=dev), width=width,
            tokens_k_n=torch.zeros(steps, n, dtype=torch.long, device=dev),
            logprobs_k_n=torch.zeros(steps, n, device=dev), j=torch.zeros(1, dtype=torch.long, device=dev))

    def decode_step(self, st: DecodeState, sampler: Callable):
        """One step of a burst, all of it on the device, so that one CUDA graph holds it whole: each
        row feeds its token at its position (its k/v written to the slot there), samples the next
        token (sampler: logits_S_V -> tokens_S, logprobs_S) into row j of the burst's outputs, and
        that token and position + 1 (up to its last) are the next step's input."""
        ids_S, pos_S, last_S = st.inputs_3_n[0], st.inputs_3_n[1], st.inputs_3_n[2]   # views
        meta = StepMeta(len(pos_S), st.tables_n_M[:, :st.width], pos_S)
        # (no logits_index: every row samples)
        logits_1_S_V, _ = self.model(ids_S[None], pos_S[None], attention=self._attention(meta))
        tokens_S, logprobs_S = sampler(logits_1_S_V[0])
        st.tokens_k_n.index_copy_(0, st.j, tokens_S[None])
        st.logprobs_k_n.index_copy_(0, st.j, logprobs_S[None])
        ids_S.copy_(tokens_S)
        torch.minimum(pos_S + 1, last_S, out=pos_S)   # past its end a sequence rewrites its last slot
        st.j += 1

    def start(self, inputs_3_S: np.ndarray, capacity: int, steps: int, sampler: Callable,
              setting: tuple) -> DecodeState:
        """The state for a burst of S rows with these inputs (token, position, last position per
        row): a CUDA graph's, for S padded to the next power of two (captured now if it is new;
        `setting` names the sampling setting that `sampler` draws with, part of the graph's key), or
        fresh buffers of S rows with tables of `capacity` blocks (the longest a sequence may need)."""
        S = inputs_3_S.shape[1]
        size = 1 << (S - 1).bit_length()
        key = (size, steps, *setting)
        # (not under autocast: a graph would replay the casts it captured, into weight copies that
        # autocast frees when its context exits)
        if self.use_graphs and S <= self.max_graph and not torch.is_autocast_enabled(self.device.type):
            if key not in self.graphs:
                self._capture(key, sampler)
            st = self.graphs[key]
        else:
            st = self.new_state(S, capacity, steps)
        padded = np.zeros((3, st.inputs_3_n.shape[1]), dtype=np.int64)
        padded[:, :S] = inputs_3_S
        st.inputs_3_n.copy_(self._pinned(padded), non_blocking=True)
        return st

    def launch(self, st: DecodeState, k: int, tables_S_M: np.ndarray, sampler: Callable):
        """Enqueue k steps on `st` (a graph replay each, or eager steps drawing with `sampler`) with
        these block tables (the first S rows), then the copy of their tokens back to the host, none
        of it waited for. -> host tensors tokens [k, S] and logprobs [k, S], and the event after
        which they are filled (None on a CPU, where they already are)."""
        S, width = tables_S_M.shape
        if st.graph is None:   # eager: as wide as the burst needs (the torch attention reads every entry)
            st.width = width
        tables = np.zeros((len(st.tables_n_M), width), dtype=np.int32)
        tables[:S] = tables_S_M
        st.tables_n_M[:, :width].copy_(self._pinned(tables), non_blocking=True)
        st.j.zero_()
        for _ in range(k):
            if st.graph is None:
                self.decode_step(st, sampler)
            else:
                st.graph.replay()
        pin = self.device.type == "cuda"
        tokens = torch.empty(k, S, dtype=torch.long, pin_memory=pin)
        logprobs = torch.empty(k, S, pin_memory=pin)
        tokens.copy_(st.tokens_k_n[:k, :S], non_blocking=True)
        logprobs.copy_(st.logprobs_k_n[:k, :S], non_blocking=True)
        return tokens, logprobs, torch.cuda.current_stream(self.device).record_event() if pin else None

    def _pinned(self, array: np.ndarray) -> Tensor:
        """A host array as a tensor a non-blocking copy can read from: pinned on a GPU (torch's caching
        host allocator keeps the buffer until the copy is done), else the array itself."""
        t = torch.from_numpy(array)
        return t.pin_memory() if self.device.type == "cuda" else t

    # ---- CUDA graphs (docstring, 4)

    def _capture(self, key: tuple, sampler: Callable):
        """A graph of a decode step for key = (rows, steps, *sampling setting), on zeroed buffers as
        wide as the longest sequence's table (every row writes slot 0 until a burst fills them in).
        The graph keeps no Python reference: `sampler` is called only while capturing."""
        rows, steps = key[:2]
        st = self.new_state(rows, self.max_blocks, steps)
        rng = self.philox_2.clone()   # the warm-up draws; they must not move this call's random numbers
        try:
            st.graph = self._graph_of(lambda: self.decode_step(st, sampler))
        except Exception as e:
            # e.g. a forward that syncs with the host. Not recovered from: a capture that failed
            # midway can leave the stream and the allocator in capture mode for the rest of the process
            raise RuntimeError("model_runner.py: the decode step cannot be captured in a CUDA graph; "
                               "Engine(model, cuda_graphs=False) decodes eagerly") from e
        self.philox_2.copy_(rng)
        self.graphs[key] = st

    def _graph_of(self, step) -> torch.cuda.CUDAGraph:
        """Run `step` once to warm up (Triton compiles, the allocator settles; off the main stream),
        then capture it in a CUDA graph that shares one memory pool with the runner's others."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            step()
        self.graph_pool = graph.pool()
        return graph
