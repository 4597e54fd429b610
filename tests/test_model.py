"""Tests for model.py: the MoE block against a naive per-expert loop, gradients, packed sequences,
the attention hook (full and one token at a time), logits_index, save/load, config errors, and a
logit-for-logit round trip with transformers' Qwen3MoeForCausalLM (skipped without transformers).
Small float64 models on the CPU; fresh random inputs from fixed seeds."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import MoE, ModelConfig, Transformer, apply_rope, rope_cos_sin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, intermediate_size=24, mlp_only_layers=[1],
            norm_topk_prob=True, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def make_model(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict({**BASE, **overrides})).to(dtype)


def randn_like_params(model, seed):
    """Re-draw every weight (norms too) so nothing relies on init values like norm weights = 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model

# ----------------------------------------------------------------------------------------------
# MoE block


def test_moe_aux_loss_leaves_padding_out():
    """With valid_N, the load-balancing loss (value and gradient) is that of the valid tokens alone:
    padding never changes it."""
    c = ModelConfig.from_dict({**BASE, "num_experts": 6, "num_experts_per_tok": 2})
    moe = randn_like_params(MoE(c).double(), seed=3)
    x = torch.randn(2, 5, c.hidden_size, dtype=torch.float64)
    valid_N = torch.tensor([True, True, False, True, False, True, True, True, False, False])
    _, aux = moe(x, valid_N)
    _, want = moe(x.reshape(-1, c.hidden_size)[valid_N][None])
    torch.testing.assert_close(aux, want)
    got_grad = torch.autograd.grad(aux, moe.gate.weight)
    torch.testing.assert_close(got_grad, torch.autograd.grad(want, moe.gate.weight))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_naive_loop(norm_topk_prob):
    c = ModelConfig.from_dict({**BASE, "num_experts": 6, "num_experts_per_tok": 3,
                               "norm_topk_prob": norm_topk_prob})
    torch.manual_seed(1)
    moe = randn_like_params(MoE(c).double(), seed=2)
    x = torch.randn(3, 7, c.hidden_size, dtype=torch.float64, requires_grad=True)
    out, aux = moe(x)

    # Reference: per token, per chosen expert, in float64; the routing (softmax, top-k, renorm) in
    # fp32, as the interface specifies.
    x_N_H = x.reshape(-1, c.hidden_size)
    probs = torch.softmax((x_N_H @ moe.gate.weight.T).float(), dim=-1)
    w, idx = probs.topk(c.num_experts_per_tok, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    probs, w = probs.double(), w.double()
    wgu, wd, I = moe.experts["gate_up_proj"], moe.experts["down_proj"], c.moe_intermediate_size
    rows = []
    for n in range(x_N_H.shape[0]):
        acc = torch.zeros(c.hidden_size, dtype=torch.float64)
        for k in range(c.num_experts_per_tok):
            e = idx[n, k]
            h = F.silu(x_N_H[n] @ wgu[e, :, :I]) * (x_N_H[n] @ wgu[e, :, I:])
            acc = acc + w[n, k] * (h @ wd[e])
        rows.append(acc)
    ref = torch.stack(rows).view_as(out)
    f = torch.stack([(idx == e).sum() for e in range(c.num_experts)]).double() / x_N_H.shape[0]
    ref_aux = c.num_experts * (f * probs.mean(0)).sum()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aux.double(), ref_aux, rtol=1e-6, atol=1e-7)

    # Gradients w.r.t. the input, the router and the experts agree too (the router's only through
    # the fp32 softmax, hence the looser tolerance there).
    gy = torch.randn_like(out)
    params = [x, moe.gate.weight, wgu, wd]
    got = torch.autograd.grad((out * gy).sum() + aux, params)
    want = torch.autograd.grad((ref * gy).sum() + ref_aux, params)
    for name, a, b in zip(["x", "router", "gate_up", "down"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_gradients_reach_every_parameter():
    for tied in (False, True):
        model = make_model(tie_word_embeddings=tied)
        ids = torch.randint(0, BASE["vocab_size"], (2, 16))
        logits, aux = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        (loss + 0.01 * aux).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            if "experts" in name:   # every expert (32 tokens x 2 copies over 4 experts)
                assert (p.grad.flatten(1).abs().sum(1) > 0).all(), name


def test_dense_and_sparse_layers_follow_hf_rule():
    m = make_model(num_hidden_layers=6, mlp_only_layers=[0], decoder_sparse_step=2)
    kinds = [type(b.mlp).__name__ for b in m.model.layers]
    assert kinds == ["MLP", "MoE", "MLP", "MoE", "MLP", "MoE"]   # (i+1) % 2 == 0 and i != 0
    # the model's aux loss is the mean of the MoE layers' losses
    per_layer = []
    for b in m.model.layers[1::2]:
        b.mlp.register_forward_hook(lambda mod, inp, out: per_layer.append(out[1]))
    _, aux = m(torch.randint(0, BASE["vocab_size"], (2, 8)))
    assert len(per_layer) == 3 and len(set(a.item() for a in per_layer)) == 3
    torch.testing.assert_close(aux, sum(per_layer) / 3)
    m = make_model(num_experts=0, mlp_only_layers=[])
    assert all(type(b.mlp).__name__ == "MLP" for b in m.model.layers)
    assert m(torch.zeros(1, 3, dtype=torch.long))[1].item() == 0.0

# ----------------------------------------------------------------------------------------------
# Attention: packed documents, the hook, logits_index


def test_packed_sequences_equal_separate_forwards():
    model = randn_like_params(make_model(), seed=3)
    lengths = [[3, 5, 4], [7, 5]]
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    doc_ids = torch.tensor([sum([[d] * n for d, n in enumerate(row)], []) for row in lengths])
    packed, _ = model(ids, doc_ids_B_T=doc_ids)
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone, _ = model(ids[b:b + 1, start:start + n])
            torch.testing.assert_close(packed[b, start:start + n], alone[0], rtol=1e-10, atol=1e-10)
            start += n


def test_rope_rotates_pairs_i_and_i_plus_half():
    """Qwen's RoPE: dims (i, i + D/2) form the complex number x_i + 1j x_{i+D/2}, rotated by the
    angle pos * theta^(-2i/D)."""
    D, theta = 8, 500.0
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    pos = torch.randint(0, 1000, (2, 5))
    cos, sin = rope_cos_sin(pos, D, theta, torch.float64)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:])
    angle = pos[:, None, :, None].double() * theta ** (-torch.arange(0, D, 2).double() / D)
    z = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(apply_rope(x, cos, sin), torch.cat([z.real, z.imag], -1),
                               rtol=2e-4, atol=2e-4)   # angles in fp32, as transformers


def test_rope_table_is_rope_cos_sin_and_bounds_the_length():
    """The model looks RoPE up in a table of every position (per device and dtype): the same numbers
    as computing them, at any positions; a sequence longer than the table is a clear error."""
    model = make_model(max_position_embeddings=64)
    pos = torch.randint(0, 64, (2, 7))
    for dtype in (torch.float64, torch.bfloat16):
        got, want = model.rope(pos, dtype), rope_cos_sin(pos, 8, 10000.0, dtype)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert len(model.rope_tables) == 2
    with pytest.raises(ValueError, match="max_position_embeddings = 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings = 64"):   # packed documents too
        model(torch.zeros(1, 65, dtype=torch.long), doc_ids_B_T=torch.zeros(1, 65, dtype=torch.long))


def explicit_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(D) + causal) v, written out, with kv heads shared by query groups."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(T, S, dtype=torch.bool).triu(S - T + 1)   # query t sees keys <= S-T+t
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def test_attention_hook_full_and_incremental():
    model = randn_like_params(make_model(), seed=4)
    ids = torch.randint(0, BASE["vocab_size"], (2, 9))
    default, aux = model(ids)
    calls = []

    def hook(layer_idx, q, k, v):
        calls.append(layer_idx)
        return explicit_causal_attention(q, k, v)

    hooked, aux_hooked = model(ids, attention=hook)
    assert calls == [0, 1, 2]
    torch.testing.assert_close(hooked, default, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aux_hooked, aux)

    # A KV cache: feed one token at a time at its position; the hook appends k/v and attends over
    # everything cached so far. The logits must equal the full forward's at every step.
    cache = {}

    def cached(layer_idx, q, k, v):
        ks, vs = cache.get(layer_idx, (k[:, :, :0], v[:, :, :0]))
        cache[layer_idx] = (torch.cat([ks, k], 2), torch.cat([vs, v], 2))
        return explicit_causal_attention(q, *cache[layer_idx])

    for t in range(ids.shape[1]):
        step, _ = model(ids[:, t:t + 1], positions_B_T=torch.full((2, 1), t), attention=cached)
        torch.testing.assert_close(step[:, 0], default[:, t], rtol=1e-10, atol=1e-10)


def test_logits_index():
    model = make_model()
    ids = torch.randint(0, BASE["vocab_size"], (3, 5))
    full, _ = model(ids)
    index = torch.tensor([4, 9, 14, 0, 7])            # last position of each row, then two others
    some, _ = model(ids, logits_index=index)
    assert some.shape == (5, BASE["vocab_size"])
    torch.testing.assert_close(some, full.reshape(15, -1)[index], rtol=1e-12, atol=1e-12)


def test_aux_loss_ignores_padding():
    # the same two sequences, padded to different lengths: with the padding masked out the aux loss
    # (and its gradient) must not depend on how much padding there is
    model = make_model()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(1, BASE["vocab_size"], (n,), generator=g) for n in (7, 4))
    auxes = []
    for T in (7, 11):
        ids = torch.zeros(2, T, dtype=torch.long)
        ids[0, :7], ids[1, :4] = a, b
        valid = torch.arange(T)[None, :] < torch.tensor([[7], [4]])
        auxes.append(model(ids, token_mask_B_T=valid)[1])
    torch.testing.assert_close(auxes[0], auxes[1], rtol=1e-12, atol=1e-12)
    ids = torch.zeros(1, 11, dtype=torch.long)
    ids[0, :7] = a
    unmasked = model(ids)[1]
    assert not torch.allclose(unmasked, model(ids, token_mask_B_T=torch.arange(11)[None] < 7)[1])
    # packing marks padding with doc id -1: the same thing, by default
    docs = torch.where(torch.arange(11) < 7, 0, -1)[None]
    torch.testing.assert_close(model(ids, doc_ids_B_T=docs)[1],
                               model(ids, doc_ids_B_T=docs, token_mask_B_T=docs >= 0)[1])


def test_return_hidden_is_what_the_lm_head_reads():
    model = make_model()
    ids = torch.randint(0, BASE["vocab_size"], (2, 6))
    logits, aux = model(ids)
    hidden, aux2 = model(ids, return_hidden=True)
    assert hidden.shape == (2, 6, model.config.hidden_size)
    torch.testing.assert_close(hidden @ model.lm_head.weight.T, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux, aux2)

# ----------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_bit_exact(tmp_path, tied):
    model = make_model(dtype=torch.float32, tie_word_embeddings=tied)
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    model.save_pretrained(path)   # overwriting an existing checkpoint works
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = Transformer.from_pretrained(path)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(0, BASE["vocab_size"], (2, 6))
    assert torch.equal(model(ids)[0], loaded(ids)[0])

    # The file holds one [out, in] matrix per expert, as transformers expects.
    tensors = load_file(path / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (not tied)
    H, I = BASE["hidden_size"], BASE["moe_intermediate_size"]
    x = torch.randn(5, H)
    for e in range(BASE["num_experts"]):
        w_gate = tensors[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"]
        w_up = tensors[f"model.layers.2.mlp.experts.{e}.up_proj.weight"]
        w_down = tensors[f"model.layers.2.mlp.experts.{e}.down_proj.weight"]
        assert w_gate.shape == w_up.shape == (I, H) and w_down.shape == (H, I)
        stacked = model.model.layers[2].mlp.experts
        torch.testing.assert_close(F.linear(x, w_gate), x @ stacked["gate_up_proj"][e, :, :I])
        torch.testing.assert_close(F.linear(x, w_up), x @ stacked["gate_up_proj"][e, :, I:])
        h = torch.randn(5, I)
        torch.testing.assert_close(F.linear(h, w_down), h @ stacked["down_proj"][e])


def test_load_sharded_checkpoint(tmp_path):
    model = make_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    for shard in set(weight_map.values()):
        save_file({k: tensors[k] for k in keys if weight_map[k] == shard},
                  tmp_path / "ckpt" / shard)
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = Transformer.from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values()))


def test_load_names_bad_shape_missing_and_unexpected_keys(tmp_path):
    make_model(dtype=torch.float32).save_pretrained(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    good = load_file(file)
    key = "model.layers.2.mlp.experts.3.down_proj.weight"
    save_file({**good, key: torch.zeros(32, 15)}, file)
    with pytest.raises(ValueError, match=r"experts\.3\.down_proj\.weight.*\[32, 15\].*\[32, 16\]"):
        Transformer.from_pretrained(tmp_path / "ckpt")
    save_file({k: v for k, v in good.items() if k != "model.norm.weight"}, file)
    with pytest.raises(ValueError, match=r"missing keys \['model\.norm\.weight'\]"):
        Transformer.from_pretrained(tmp_path / "ckpt")
    save_file({**good, "model.layers.1.mlp.gate.weight": torch.zeros(4, 32)}, file)
    with pytest.raises(ValueError, match=r"unexpected keys \['model\.layers\.1\.mlp\.gate"):
        Transformer.from_pretrained(tmp_path / "ckpt")

# ----------------------------------------------------------------------------------------------
# Config


def write_config(tmp_path, d):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_head_dim_must_be_even(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json: config key 'head_dim' = 33 must be even"):
        ModelConfig.from_json(write_config(tmp_path, {**BASE, "head_dim": 33}))


def test_config_errors_name_the_key_and_file(tmp_path):
    missing = {k: v for k, v in BASE.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match=r"config\.json: config key 'hidden_size' is missing"):
        ModelConfig.from_json(write_config(tmp_path, missing))
    for key, value in [("hidden_size", "32"), ("num_experts_per_tok", 2.0), ("rope_theta", True),
                       ("tie_word_embeddings", 1), ("mlp_only_layers", [1.5])]:
        with pytest.raises(ValueError, match=rf"config\.json: config key '{key}' must be"):
            ModelConfig.from_json(write_config(tmp_path, {**BASE, key: value}))
    no_experts = {k: v for k, v in BASE.items() if k != "num_experts"}
    with pytest.raises(ValueError, match=r"'num_experts \(or num_local_experts\)' is missing"):
        ModelConfig.from_dict(no_experts)
    with pytest.raises(ValueError, match=r"'num_experts' = 4 disagrees with num_local_experts = 8"):
        ModelConfig.from_dict({**BASE, "num_local_experts": 8})
    with pytest.raises(ValueError, match=r"'num_key_value_heads' = 3 must divide"):
        ModelConfig.from_dict({**BASE, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"'decoder_sparse_step' must be >= 1, found 0"):
        ModelConfig.from_dict({**BASE, "decoder_sparse_step": 0})
    with pytest.raises(ValueError, match=r"'rope_theta' = 10000.0 disagrees with rope_parameters"):
        ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 1e6}})
    (tmp_path / "broken.json").write_text('{"vocab_size": 97,')
    with pytest.raises(ValueError, match=r"broken\.json: not JSON"):
        ModelConfig.from_json(tmp_path / "broken.json")
    with pytest.raises(ValueError, match=r"'rope_parameters' asks for rope_type 'yarn'"):
        ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    for key in ("attention_bias", "use_sliding_window"):   # read, never silently ignored
        with pytest.raises(ValueError, match=rf"config key '{key}' is true; not implemented"):
            ModelConfig.from_dict({**BASE, key: True})


def test_config_spellings_and_defaults():
    ref = ModelConfig.from_dict(BASE)
    five = {k: v for k, v in BASE.items() if k not in ("num_experts", "rope_theta", "head_dim")}
    five.update(num_local_experts=4, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                dtype="bfloat16", use_cache=True, some_future_key={"x": 1})   # tolerated
    assert ModelConfig.from_dict(five) == ref   # head_dim defaults to hidden // heads = 8
    assert ModelConfig.from_dict({**BASE, "num_local_experts": 4}) == ref
    assert ModelConfig.from_dict(ref.to_dict()) == ref


@pytest.mark.parametrize("name", ["tiny", "small", "bench"])
def test_shipped_configs(name):
    c = ModelConfig.from_json(os.path.join(ROOT, "configs", f"{name}.json"))
    # parameter counts from the shapes, without building the bench model's 215M parameters
    H, L, E = c.hidden_size, c.num_hidden_layers, c.num_experts
    attn = H * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * c.head_dim
    layer = attn + 2 * H + H * E + 3 * E * H * c.moe_intermediate_size
    total = L * layer + H + c.vocab_size * H * (1 if c.tie_word_embeddings else 2)
    lo, hi = dict(tiny=(1e6, 3e6), small=(50e6, 150e6), bench=(210e6, 220e6))[name]
    assert lo < total < hi, total
    if name == "tiny":
        model = Transformer(c)
        assert model.num_params() == total
        inactive = L * (E - c.num_experts_per_tok) * 3 * H * c.moe_intermediate_size
        assert model.num_params(active_only=True) == total - inactive

# ----------------------------------------------------------------------------------------------
# transformers round trip


# transformers runs in a process of its own, without the project on its path (conftest.py says why)
HF_ROUND_TRIP = """
import torch, transformers
from safetensors.torch import load_file, save_file
ids = load_file("ids.safetensors")["ids"]
hf = transformers.Qwen3MoeForCausalLM.from_pretrained("ours", dtype=torch.float32)
out = hf(input_ids=ids, output_router_logits=True)
torch.manual_seed(6)
theirs = transformers.Qwen3MoeForCausalLM(hf.config).float()
g = torch.Generator().manual_seed(7)
with torch.no_grad():
    for p in theirs.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
theirs.save_pretrained("theirs")
save_file({"ours_logits": out.logits.contiguous(), "aux": out.aux_loss.reshape(1),
           "theirs_logits": theirs(input_ids=ids).logits.contiguous()}, "out.safetensors")
"""


def test_transformers_round_trip(tmp_path, transformers_python):
    for tied in (False, True):
        model = randn_like_params(make_model(dtype=torch.float32, tie_word_embeddings=tied,
                                             num_hidden_layers=2, mlp_only_layers=[0]), seed=5)
        ids = torch.randint(0, BASE["vocab_size"], (2, 10))
        ours, aux = model(ids)
        model.save_pretrained(tmp_path / "ours")
        save_file({"ids": ids}, tmp_path / "ids.safetensors")
        transformers_python(HF_ROUND_TRIP, tmp_path)
        out = load_file(tmp_path / "out.safetensors")
        # ours -> transformers: same logits, and (one MoE layer) the same aux loss
        torch.testing.assert_close(out["ours_logits"], ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["aux"][0], aux, rtol=1e-5, atol=1e-6)
        # transformers -> ours: a freshly initialized HF model, saved by transformers
        back = Transformer.from_pretrained(tmp_path / "theirs")
        torch.testing.assert_close(back(ids)[0], out["theirs_logits"], rtol=1e-4, atol=1e-4)
