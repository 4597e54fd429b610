"""The model: a Qwen3-MoE-compatible decoder-only transformer, written out by hand.

Read top to bottom:
  1. ModelConfig   the Hugging Face Qwen3-MoE `config.json` keys (checked at the end of the file).
  2. RMSNorm, RoPE the two small pieces every modern decoder shares.
  3. Attention     grouped-query attention (GQA) with RMSNorm on q and k per head before RoPE
                   (Qwen3's "QK-norm"). Causal, and block-diagonal when several documents are
                   packed into one row (SFT). An `attention` callable can replace the core, which
                   is how the rollout engine runs these very layers over its paged KV cache
                   (model_runner.py).
  4. MoE block     router -> top-k routing -> SwiGLU experts as two grouped GEMMs over the token
                   copies sorted by expert -> weighted sum back in token order; plus the
                   Switch/Qwen3-MoE load-balancing loss. Some layers may be dense SwiGLU MLPs.
  5. Transformer   embeddings, the blocks, final norm, LM head; last, save/load in the Hugging Face
                   layout (config.json + model.safetensors) so that `transformers` loads what we
                   save and we load what it saves (tests/test_model.py checks both ways).
model.py imports nothing of the project but kernels/.

Submodule names mirror Hugging Face's, so state_dict keys map 1:1, except for two fusions: each
attention's q, k and v projections are one `self_attn.qkv_proj` (rows q | k | v) and each MoE
layer's experts are stacked (`mlp.experts.gate_up_proj` [E, H, 2I], `mlp.experts.down_proj`
[E, I, H], the [in, out] orientation grouped_mm wants), while the checkpoint has q_proj, k_proj,
v_proj and one key per expert.
"""

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kernels import combine, grouped_mm, grouped_swiglu, route, use_triton
from kernels.qk_norm_rope import qk_norm_rope_triton

# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    """Qwen3-MoE hyperparameters under their `config.json` names. Fields without a default are
    required; the defaults are transformers' Qwen3MoeConfig defaults."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int                # spelled num_local_experts by transformers 5.x
    num_experts_per_tok: int
    moe_intermediate_size: int      # width of one expert
    intermediate_size: int          # width of the dense MLP layers (mlp_only_layers etc.)
    head_dim: int = 0               # 0 = hidden_size // num_attention_heads (transformers' rule)
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    norm_topk_prob: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, d, source="<dict>"):
        """A config.json's keys, checked one by one (parse_config, at the end of this file)."""
        return parse_config(d, source)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            try:
                return parse_config(json.load(f), str(path))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None

    def to_dict(self):
        # Written in transformers 4.x style (num_experts, rope_theta); 5.x reads it too.
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                    hidden_act="silu", attention_bias=False, **asdict(self))

    def is_moe_layer(self, i):
        # transformers' rule for which layers are sparse
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    # torch's rms_norm with the weight, which it can run as one fused kernel: normalize in fp32,
    # scale, round once (transformers rounds before scaling, so bf16 results may differ in the
    # last bit). The weight takes x's dtype: under autocast fp32 weights meet bf16 activations,
    # and torch does not fuse mixed dtypes.
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def rope_cos_sin(positions_B_T, head_dim, theta, dtype):
    """cos and signed sin [B, 1, T, D] for rotary embeddings at arbitrary (e.g. per-document)
    positions: cos = (cos a, cos a), sin = (-sin a, sin a), a = position * theta^(-2i/D)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions_B_T.device,
                                            dtype=torch.float32) / head_dim)
    angles_B_T_D2 = positions_B_T.float()[..., None] * inv_freq
    cos, sin = angles_B_T_D2.cos(), angles_B_T_D2.sin()
    return (torch.cat([cos, cos], dim=-1)[:, None].to(dtype),
            torch.cat([-sin, sin], dim=-1)[:, None].to(dtype))


def apply_rope(x_B_H_T_D, cos, sin):
    """The "rotate half" convention (GPT-NeoX / Llama / Qwen): dims i and i + D/2 form a pair
    (x1, x2), rotated to (x1 cos a - x2 sin a, x2 cos a + x1 sin a). x rolled by D/2 is (x2, x1);
    times the signed sin it is the second term of both. Three kernels: a roll, a mul, an addcmul."""
    return torch.addcmul(x_B_H_T_D * cos, x_B_H_T_D.roll(x_B_H_T_D.shape[-1] // 2, dims=-1), sin)


def qk_norm_rope(q_B_T_Hq_D, k_B_T_Hkv_D, q_weight_D, k_weight_D, cos, sin, eps):
    """Qwen3's QK-norm (RMSNorm over head_dim, one weight for all heads of q, one for k), then
    RoPE; -> q [B, Hq, T, D], k [B, Hkv, T, D]. kernels/qk_norm_rope.py does the same in one launch."""
    q = apply_rope(rms_norm(q_B_T_Hq_D, q_weight_D, eps).transpose(1, 2), cos, sin)
    k = apply_rope(rms_norm(k_B_T_Hkv_D, k_weight_D, eps).transpose(1, 2), cos, sin)
    return q, k


def decoding(attention) -> bool:
    """Whether this forward may take the forward-only kernels (QK-norm + RoPE, SwiGLU in the expert
    GEMM): when it runs through the rollout engine's KV cache (an attention callable: decode steps
    and prefill chunks alike) with no gradient recorded.
    Every forward that computes logprobs to train on or against (the policy's, a reference's, a
    teacher's) keeps the torch path, so they are all computed the same way; only the rollout
    differs from them, at bf16 rounding, as its paged attention already makes it."""
    return attention is not None and not torch.is_grad_enabled()


def causal_attention(q_B_Hq_T_D, k_B_Hkv_S_D, v_B_Hkv_S_D, mask_B_1_T_S=None):
    """Default attention core for training: causal, or the given mask [B, 1, T, S] (True = may
    attend; training's block-diagonal causal one, or the rollout engine's over a cached context of
    S tokens, k/v [B, Hkv, S, D])."""
    groups = q_B_Hq_T_D.shape[1] // k_B_Hkv_S_D.shape[1]
    # GQA: each kv head serves `groups` query heads. Repeating k/v (cheap next to the MoE) keeps
    # every SDPA backend available, including the memory-efficient one that takes a mask (with
    # enable_gqa=True a masked call gets only the math backend, which writes the scores out in fp32).
    k = k_B_Hkv_S_D.repeat_interleave(groups, dim=1)
    v = v_B_Hkv_S_D.repeat_interleave(groups, dim=1)
    if mask_B_1_T_S is None:
        return F.scaled_dot_product_attention(q_B_Hq_T_D, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q_B_Hq_T_D, k, v, attn_mask=mask_B_1_T_S)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx):
        super().__init__()
        self.layer_idx, self.n_q, self.n_kv, self.d = (layer_idx, c.num_attention_heads,
                                                       c.num_key_value_heads, c.head_dim)
        # q | k | v in one weight (the module docstring): one GEMM, and q, k, v are views of its output
        self.qkv_proj = nn.Linear(c.hidden_size, (self.n_q + 2 * self.n_kv) * self.d, bias=False)
        self.o_proj = nn.Linear(self.n_q * self.d, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, c.rms_norm_eps)   # per head, over head_dim only
        self.k_norm = RMSNorm(self.d, c.rms_norm_eps)

    def forward(self, x_B_T_H, cos, sin, mask, attention):
        B, T, _ = x_B_T_H.shape
        q, k, v = self.qkv_proj(x_B_T_H).split([self.n_q * self.d] + [self.n_kv * self.d] * 2, dim=-1)
        q = q.view(B, T, self.n_q, self.d)
        k = k.view(B, T, self.n_kv, self.d)
        v = v.view(B, T, self.n_kv, self.d).transpose(1, 2)
        # decoding on the GPU: the norms and RoPE in one (forward-only) kernel
        norm_rope = qk_norm_rope_triton if decoding(attention) and use_triton(q) else qk_norm_rope
        q, k = norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps)
        if attention is None:
            out_B_Hq_T_D = causal_attention(q, k, v, mask)
        else:
            out_B_Hq_T_D = attention(self.layer_idx, q, k, v)
        return self.o_proj(out_B_Hq_T_D.transpose(1, 2).reshape(B, T, self.n_q * self.d))


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x, valid_N=None, decode=False):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


class MoE(nn.Module):
    """Sparse SwiGLU mixture of experts. Each token goes to its top-k experts; the k outputs are
    summed with the routing weights. Instead of a Python loop over experts, we sort the N*K token
    copies by expert (route does that) and run all experts as one grouped GEMM: expert e multiplies
    the contiguous rows offsets[e]:offsets[e+1]. gate and up are fused into one [E, H, 2I] weight,
    and the gather of token rows into expert order is fused into the first GEMM (gather_idx)."""
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.E, self.K, self.norm_topk_prob = c.num_experts, c.num_experts_per_tok, c.norm_topk_prob
        H, I = c.hidden_size, c.moe_intermediate_size
        self.gate = nn.Linear(H, self.E, bias=False)     # the router (named `gate` as in Qwen3-MoE)
        self.experts = nn.ParameterDict(dict(
            gate_up_proj=nn.Parameter(torch.empty(self.E, H, 2 * I)),   # gate | up, fused
            down_proj=nn.Parameter(torch.empty(self.E, I, H))))

    def forward(self, x_B_T_H, valid_N=None, decode=False):
        B, T, H = x_B_T_H.shape
        x_N_H = x_B_T_H.reshape(-1, H)
        N = x_N_H.shape[0]
        r = route(self.gate(x_N_H), self.K, self.norm_topk_prob)     # (softmax in fp32 inside)
        if decode:   # the same, with SwiGLU in the GEMM's epilogue on the GPU (forward only)
            act_M_I = grouped_swiglu(x_N_H, self.experts["gate_up_proj"], r.offsets_E1, r.token_M)
        else:
            h_M_2I = grouped_mm(x_N_H, self.experts["gate_up_proj"], r.offsets_E1, r.token_M,
                                r.unsort_idx.view(N, self.K))      # token -> rows of its copies
            gate_M_I, up_M_I = h_M_2I.chunk(2, dim=-1)
            act_M_I = F.silu(gate_M_I) * up_M_I
        y_M_H = grouped_mm(act_M_I, self.experts["down_proj"], r.offsets_E1)
        # back to token order (copy index = token*K + k), summed with the routing weights
        out_N_H = combine(y_M_H, r.weights_N_K, r.unsort_idx)
        # Load balancing (Switch Transformer eq. 4, Qwen3-MoE's form): E * sum_e f_e * P_e, with
        # f_e the fraction of tokens sent to expert e (counted over the k slots, so sum_e f_e = k,
        # as transformers does) and P_e the mean router probability. Only P_e carries gradient.
        # Padding tokens (valid_N False) are left out, so how a batch is padded does not change it.
        # A training loss: not computed in eval mode (the rollout engine's decode steps).
        if not self.training:
            return out_N_H.view(B, T, H), None
        # (counted by an index_add of 0s and 1s, exact: a boolean index or bincount syncs the GPU)
        valid = r.probs_N_E.new_ones(N) if valid_N is None else valid_N.float()
        n = valid.sum().clamp(min=1)
        f_E = valid.new_zeros(self.E).index_add_(0, r.experts_N_K.flatten(), valid.repeat_interleave(self.K)) / n
        P_E = (r.probs_N_E * valid[:, None]).sum(dim=0) / n
        aux = self.E * (f_E * P_E).sum()
        return out_N_H.view(B, T, H), aux


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c) if c.is_moe_layer(layer_idx) else MLP(c)

    def forward(self, x, cos, sin, mask, attention, valid_N=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, attention)
        mlp_out, aux = self.mlp(self.post_attention_layernorm(x), valid_N, decoding(attention))
        return x + mlp_out, aux

# ----------------------------------------------------------------------------------------------
# The transformer


def document_positions_and_mask(doc_ids_B_T):
    """Packed rows: positions restart at 0 at each document, and a block-diagonal causal mask
    [B, 1, T, T] (True = may attend). A document is a run of equal consecutive doc ids."""
    B, T = doc_ids_B_T.shape
    t_B_T = torch.arange(T, device=doc_ids_B_T.device).expand(B, T)
    is_start_B_T = torch.ones_like(doc_ids_B_T, dtype=torch.bool)
    is_start_B_T[:, 1:] = doc_ids_B_T[:, 1:] != doc_ids_B_T[:, :-1]
    start_B_T = torch.where(is_start_B_T, t_B_T, 0).cummax(dim=1).values   # start of own document
    segment_B_T = is_start_B_T.long().cumsum(dim=1)
    same_doc = segment_B_T[:, :, None] == segment_B_T[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids_B_T.device).tril()
    return t_B_T - start_B_T, (same_doc & causal)[:, None]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size),
            layers=nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers)),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps)))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_tables = {}   # (device, dtype) -> RoPE's cos, sin of every position (rope())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # normal(0, 0.02) everywhere (transformers' initializer_range); the projections that write
        # into the residual stream get 1/sqrt(2L) of that (GPT-2), so the residual stream does not
        # grow with depth; norms start at 1.
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids_B_T, positions_B_T=None, doc_ids_B_T=None, attention=None,
                logits_index=None, return_hidden=False, token_mask_B_T=None):
        """-> (logits [B, T, V] or [len(logits_index), V], load-balancing aux loss).
        attention: None for training (causal, block-diagonal with doc_ids), or a callable
          attention(layer_idx, q_B_Hq_T_D, k_B_Hkv_T_D, v_B_Hkv_T_D) -> out_B_Hq_T_D that receives
          q, k after QK-norm and RoPE (model_runner.py's, over the paged KV cache).
        logits_index: flat indices into B*T; only those positions go through the LM head.
        return_hidden: return the final-norm hidden states [B, T, C] instead of logits (the reward
          model of rlhf.py puts its own scalar head on them).
        token_mask_B_T: True on real tokens, False on padding, which the aux loss then ignores
          (default: doc_ids >= 0 when doc_ids are given, since packing marks padding with -1).
        aux: mean over MoE layers of E * sum_e f_e P_e, NOT multiplied by router_aux_loss_coef.
          (transformers pools f and P over all layers at once; the per-layer mean is Switch's
          definition and equals it when there is one MoE layer.) 0 in eval mode, where it is not
          computed."""
        B, T = input_ids_B_T.shape
        c = self.config
        if positions_B_T is None and T > c.max_position_embeddings:   # (given positions: the caller's)
            raise ValueError(f"model.py: a row of {T} tokens is longer than the config's "
                             f"max_position_embeddings = {c.max_position_embeddings}")
        mask = None
        if doc_ids_B_T is not None:
            doc_positions_B_T, mask = document_positions_and_mask(doc_ids_B_T)
            positions_B_T = doc_positions_B_T if positions_B_T is None else positions_B_T
        if positions_B_T is None:
            positions_B_T = torch.arange(T, device=input_ids_B_T.device).expand(B, T)
        if token_mask_B_T is None and doc_ids_B_T is not None:
            token_mask_B_T = doc_ids_B_T >= 0
        valid_N = None if token_mask_B_T is None else token_mask_B_T.reshape(-1).bool()
        x = self.model.embed_tokens(input_ids_B_T)
        cos, sin = self.rope(positions_B_T, x.dtype)
        aux_losses = []
        for block in self.model.layers:
            x, aux = block(x, cos, sin, mask, attention, valid_N)
            if aux is not None:
                aux_losses.append(aux)
        x = self.model.norm(x)
        aux = torch.stack(aux_losses).mean() if aux_losses else x.new_zeros((), dtype=torch.float32)
        if return_hidden:
            return x, aux
        if logits_index is not None:
            x = x.reshape(B * T, -1)[logits_index]
        return self.lm_head(x), aux

    def rope(self, positions_B_T, dtype):
        """rope_cos_sin at these positions, looked up in a table of every position below
        max_position_embeddings, built once per device and dtype (the same numbers): two gathers per
        forward instead of a dozen small kernels, which matters when decoding one token at a time."""
        key = (positions_B_T.device, dtype)
        if key not in self.rope_tables:
            c = self.config
            every = torch.arange(c.max_position_embeddings, device=positions_B_T.device)[None]
            cos, sin = rope_cos_sin(every, c.head_dim, c.rope_theta, dtype)
            self.rope_tables[key] = cos[0, 0], sin[0, 0]
        cos_P_D, sin_P_D = self.rope_tables[key]
        return cos_P_D[positions_B_T][:, None], sin_P_D[positions_B_T][:, None]

    def num_params(self, active_only=False):
        """All parameters (a tied embedding counted once); active_only: only k of E experts."""
        n = sum(p.numel() for p in self.parameters())
        if active_only:
            for block in self.model.layers:
                if isinstance(block.mlp, MoE):
                    per_expert = sum(p[0].numel() for p in block.mlp.experts.values())
                    n -= (block.mlp.E - block.mlp.K) * per_expert
        return n

    # ------------------------------------------------------------------------------------------
    # Hugging Face layout: config.json + model.safetensors, one key per expert in [out, in].

    def hf_state_dict(self, state=None):
        """Our state (or `state`, a state dict of this model) as the checkpoint's tensors (views)."""
        out = {}
        c = self.config
        for name, t in (self.state_dict() if state is None else state).items():
            if name.endswith("qkv_proj.weight"):
                prefix = name[: -len("qkv_proj.weight")]
                sizes = [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
                for part, rows in zip(("q", "k", "v"), t.split(sizes)):
                    out[f"{prefix}{part}_proj.weight"] = rows
            elif name.endswith("experts.gate_up_proj"):
                prefix, I = name[: -len("gate_up_proj")], t.shape[2] // 2
                for e in range(t.shape[0]):
                    out[f"{prefix}{e}.gate_proj.weight"] = t[e, :, :I].T
                    out[f"{prefix}{e}.up_proj.weight"] = t[e, :, I:].T
            elif name.endswith("experts.down_proj"):
                for e in range(t.shape[0]):
                    out[f"{name[: -len('down_proj')]}{e}.down_proj.weight"] = t[e].T
            elif not (name == "lm_head.weight" and self.config.tie_word_embeddings):
                out[name] = t
        return out

    def save_pretrained(self, path, state=None):
        """config.json + model.safetensors into the directory `path`. state: a full state dict to write
        instead of the module's own (one gathered from FSDP shards). Not atomic by itself:
        common.save_checkpoint writes into a temporary directory and renames it into place."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.hf_state_dict(state).items()}
        config = self.config.to_dict()
        config["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """The model of a checkpoint directory, read one tensor at a time into parameters allocated
        once and never initialized (each is overwritten): a large checkpoint costs the model's memory,
        not twice that, and no time drawing random weights."""
        config = ModelConfig.from_json(os.path.join(path, "config.json"))
        # one model.safetensors, or shards listed in an index (large Hub checkpoints)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        where = {}   # key -> its file, from the files' headers
        for file in [os.path.join(path, name) for name in files]:
            try:
                with safe_open(file, framework="pt") as f:
                    where.update(dict.fromkeys(f.keys(), file))
            except SafetensorError as e:   # cut short, or not safetensors
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        with torch.device("meta"):   # shapes only
            model = cls(config).to(dtype)
        model = model.to_empty(device=device)
        if config.tie_word_embeddings:   # (to_empty makes new parameters: tie them again)
            model.lm_head.weight = model.model.embed_tokens.weight
            where.pop("lm_head.weight", None)   # some tied checkpoints store it anyway
        expected = model.hf_state_dict()
        assert sum(t.numel() for t in expected.values()) == sum(p.numel() for p in model.parameters()), \
            "model.py: hf_state_dict() must cover every parameter (the others would stay uninitialized)"
        missing = [k for k in expected if k not in where]
        unexpected = [k for k in where if k not in expected]
        if missing or unexpected:
            raise ValueError(f"{path}: {len(missing)} missing keys {missing[:5]}, "
                             f"{len(unexpected)} unexpected keys {unexpected[:5]} (first 5 shown)")
        with torch.no_grad():
            for file in sorted(set(where.values())):
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for key in [k for k in f.keys() if k in expected]:
                        dst, shape = expected[key], f.get_slice(key).get_shape()
                        if list(shape) != list(dst.shape):
                            raise ValueError(f"{file}: '{key}' has shape {list(shape)}, "
                                             f"expected {list(dst.shape)} from config.json")
                        dst.copy_(f.get_tensor(key))   # views into our parameters: writes through
        return model


# ----------------------------------------------------------------------------------------------
# config.json: the checks behind ModelConfig.from_dict / from_json


# integer keys for which 0 means something (no experts: a dense model; head_dim 0: the default)
ZERO_ALLOWED = {"num_experts", "num_experts_per_tok", "head_dim", "intermediate_size",
                "moe_intermediate_size"}


def parse_config(d, source="<dict>"):
    """A Qwen3-MoE config.json (a dict) -> ModelConfig. Both spellings found in the wild are read;
    keys the model does not use are tolerated; a missing or ill-typed key, or a feature we do not
    implement, is a ValueError naming `source` and the key."""
    def bad(key, why):
        raise ValueError(f"{source}: config key '{key}' {why}")
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a config must be a JSON object, found {type(d).__name__}")
    d = dict(d)
    # Two spellings in the wild: num_experts (transformers 4.x, the Qwen3 Hub files) and
    # num_local_experts (5.x). Either is fine; both must agree.
    if "num_local_experts" in d:
        if "num_experts" in d and d["num_experts"] != d["num_local_experts"]:
            bad("num_experts", f"= {d['num_experts']!r} disagrees with num_local_experts = "
                f"{d['num_local_experts']!r}")
        d["num_experts"] = d["num_local_experts"]
    # RoPE: rope_theta at top level (4.x) or inside rope_parameters (5.x); only plain RoPE.
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            bad(key, f"must be an object, found {type(rope).__name__}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            bad(key, f"asks for rope_type {rope.get('rope_type', rope.get('type'))!r}; only "
                "'default' RoPE is implemented")
        if "rope_theta" in rope and d.setdefault("rope_theta", rope["rope_theta"]) != rope["rope_theta"]:
            bad("rope_theta", f"= {d['rope_theta']!r} disagrees with {key}.rope_theta")
    for key in ("attention_bias", "use_sliding_window"):
        if d.get(key):
            bad(key, "is true; not implemented (Qwen3-MoE has no attention biases, and attends in full)")
    if d.get("hidden_act", "silu") != "silu":
        bad("hidden_act", f"is {d['hidden_act']!r}; only 'silu' (SwiGLU) is implemented")
    kwargs = {}
    for f in fields(ModelConfig):
        value = d.get(f.name)
        if value is None:
            if f.default is MISSING and f.default_factory is MISSING:
                also = " (or num_local_experts)" if f.name == "num_experts" else ""
                bad(f.name + also, "is missing")
            continue
        ok = {int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              bool: isinstance(value, bool),
              list: isinstance(value, list) and all(type(v) is int for v in value)}[f.type]
        if not ok:
            want = "a list of ints" if f.type is list else f.type.__name__
            bad(f.name, f"must be {want}, found {value!r} ({type(value).__name__})")
        minimum = 0 if f.name in ZERO_ALLOWED else 1
        if f.type is int and value < minimum:
            bad(f.name, f"must be >= {minimum}, found {value}")
        kwargs[f.name] = float(value) if f.type is float else value
    c = ModelConfig(**kwargs)
    if c.head_dim == 0:
        c.head_dim = c.hidden_size // c.num_attention_heads
    if c.head_dim < 2 or c.head_dim % 2:   # RoPE rotates pairs of dimensions
        bad("head_dim", f"= {c.head_dim} must be even and >= 2 (RoPE rotates pairs of dimensions)")
    if c.num_attention_heads % c.num_key_value_heads:
        bad("num_key_value_heads", f"= {c.num_key_value_heads} must divide "
            f"num_attention_heads = {c.num_attention_heads}")
    if c.num_experts > 0 and not 0 < c.num_experts_per_tok <= c.num_experts:
        bad("num_experts_per_tok", f"= {c.num_experts_per_tok} must be in 1..num_experts")
    return c
