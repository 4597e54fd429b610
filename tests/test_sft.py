"""Tests for sft.py: packing keeps documents apart, the labels are the next trained token, a tiny
model overfits a fixed batch, DDP and FSDP2 (2 gloo processes) equal one process on the same global
batch, a resumed run continues bit-exactly (and across FSDP and one process, both ways), and a
malformed JSONL line is reported with file:line.

The data is hand-written (arithmetic with and without reasoning, a tool call) with a tokenizer of
384 ids trained on it once per module; the model is configs/tiny.json made smaller."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import common
import data
import sft
from data.chat import encode_chat, render
from data.tokenizer import save_tokenizer, train_tokenizer
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 384


def conversations(n):
    convs = []
    for i in range(n):
        a, b = 3 + 7 * i % 50, 11 + 5 * i % 40
        msgs = [{"role": "user", "content": f"What is {a} plus {b}?"}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You are a careful calculator."})
        answer = {"role": "assistant", "content": f"The answer is \\boxed{{{a + b}}}."}
        if i % 2 == 0:  # thinking mode
            answer["reasoning"] = f"{a} + {b} = {a + b}."
        msgs.append(answer)
        if i % 4 == 1:  # a multi-turn tool conversation
            msgs += [{"role": "user", "content": "And the weather in Oslo?"},
                     {"role": "assistant", "content": None,
                      "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
                     {"role": "tool", "content": "rainy"},
                     {"role": "assistant", "content": "It is rainy in Oslo."}]
        convs.append({"messages": msgs, "domain": "math"})
    return convs


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    convs = conversations(24)
    texts = ["".join(text for text, _ in render(c["messages"])) for c in convs]
    save_tokenizer(train_tokenizer(texts, VOCAB), str(d / "tokenizer.json"))
    write_jsonl(d / "sft.jsonl", convs)
    write_jsonl(d / "small.jsonl", convs[:3])  # fits in one row: a fixed batch
    with open(os.path.join(ROOT, "configs", "tiny.json")) as f:
        config = json.load(f)
    config.update(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64, intermediate_size=128)
    with open(d / "config.json", "w") as f:
        json.dump(config, f)
    return d


def args(data_dir, out, *extra):
    return ["--config", str(data_dir / "config.json"), "--data", str(data_dir), "--out", str(out),
            "--device", "cpu", "--log_every", "1", *map(str, extra)]


def losses(out):
    return [r["loss"] for r in common.read_metrics(os.path.join(out, "metrics.jsonl"))]


def test_help_explains_every_argument():
    actions = sft.build_parser()._actions
    assert all(a.help for a in actions)
    names = {a.dest for a in actions}
    assert {"init", "config", "out", "data", "sft_file", "seed", "device", "dtype", "steps", "lr",
            "warmup", "save_every", "log_every", "batch_size", "seq_len", "grad_accum",
            "weight_decay", "grad_clip"} <= names


def test_pack_shift_and_mask_by_hand():
    I = sft.IGNORE
    docs = [([1, 2, 3, 4], [0, 0, 1, 1]),
            ([5, 6, 7], [0, 1, 1]),
            (list(range(8, 18)), [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]),  # 10 > 8: truncated, own row
            ([20, 21], [0, 1])]
    input_ids, doc_ids, labels, truncated = sft.pack(docs, seq_len=8, pad_id=0)
    assert truncated == 1
    assert input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0],
                                  [8, 9, 10, 11, 12, 13, 14, 15],
                                  [20, 21, 0, 0, 0, 0, 0, 0]]
    assert doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1],
                                [0] * 8,
                                [0, 0, -1, -1, -1, -1, -1, -1]]
    # position i predicts token i+1 when token i+1 is trained and in the same document
    assert labels.tolist() == [[I, 3, 4, I, 6, 7, I, I],
                               [I, I, 11, 12, 13, 14, 15, I],
                               [21, I, I, I, I, I, I, I]]


def test_packed_loss_equals_per_document_losses(data_dir):
    tok = data.load_tokenizer(str(data_dir / "tokenizer.json"))
    docs = [encode_chat(tok, c["messages"]) for c in conversations(4)]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(data_dir / "config.json")).double()
    seq_len = sum(len(ids) for ids, _ in docs) + 5
    input_ids, doc_ids, labels, _ = sft.pack(docs, seq_len, pad_id=0)
    assert input_ids.shape[0] == 1  # all four in one row
    with torch.no_grad():
        packed, _ = sft.sft_loss(model, input_ids, doc_ids, labels)
        leaky, _ = sft.sft_loss(model, input_ids, None, labels)  # one causal mask over the row
        expected = 0.0
        for ids, mask in docs:  # each conversation alone, shift done here by hand
            logits, _ = model(torch.tensor([ids]))
            logp = F.log_softmax(logits[0, :-1].double(), dim=-1)
            nll = -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            expected += (nll * torch.tensor(mask[1:], dtype=torch.float64)).sum()
    assert torch.allclose(packed, expected, rtol=1e-10, atol=0)
    assert abs(leaky - expected) > 1e-6 * expected  # the check above can fail


def test_overfits_a_fixed_batch_and_final_means_done(data_dir, tmp_path):
    argv = args(data_dir, tmp_path, "--sft_file", data_dir / "small.jsonl", "--steps", 25,
                "--batch_size", 1, "--seq_len", 192, "--lr", 1e-2, "--warmup", 3)
    summary = sft.main(argv)
    assert summary["rows"] == 1 and summary["steps"] == 25
    curve = losses(tmp_path)
    assert len(curve) == 25 and curve[-1] == pytest.approx(summary["loss"])
    assert curve[0] / curve[-1] >= 5, curve
    assert common.checkpoint_exists(tmp_path / "final") and not os.path.exists(tmp_path / "last")
    assert sft.main(argv) == summary and len(losses(tmp_path)) == 25  # done: no more training


def test_step_gradient_is_the_token_level_mean(data_dir, tmp_path):
    # one step, 2 microbatches, clipping off: the logged loss and gradient norm must be those of
    # (CE summed over the whole global batch) / (its trained tokens) + coef * (mean aux over microbatches)
    sft.main(args(data_dir, tmp_path, "--steps", 1, "--batch_size", 4, "--grad_accum", 2,
                  "--seq_len", 96, "--grad_clip", 0))
    logged = common.read_metrics(tmp_path / "metrics.jsonl")[0]
    tok = data.load_tokenizer(str(data_dir / "tokenizer.json"))
    input_ids, doc_ids, labels, _, _ = sft.load_rows(tok, data_dir / "sft.jsonl", 96, seed=0)
    rows, _, _ = sft.batch_rows(len(input_ids), 4, seed=0, epoch=0, pos=0)
    torch.manual_seed(0)  # the run's init, then a float64 reference
    model = Transformer(ModelConfig.from_json(data_dir / "config.json")).double()
    logits, _ = model(input_ids[rows], doc_ids_B_T=doc_ids[rows])  # all four rows at once
    trained = labels[rows] != sft.IGNORE
    nll = -F.log_softmax(logits[trained], dim=-1).gather(1, labels[rows][trained][:, None])
    ce = nll.sum() / trained.sum()
    aux = sum(model(input_ids[mb], doc_ids_B_T=doc_ids[mb])[1] for mb in (rows[:2], rows[2:])) / 2
    (ce + model.config.router_aux_loss_coef * aux).backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert logged["loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert logged["aux_loss"] == pytest.approx(aux.item(), rel=1e-6)
    assert logged["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)


class Killed(Exception):
    pass


def run_killed_after_checkpoint(monkeypatch, argv):
    """sft.main, killed right after it writes its first OUT/last checkpoint."""
    save = common.save_checkpoint

    def save_then_die(path, *a, **k):
        save(path, *a, **k)
        if os.path.basename(path) == "last":
            raise Killed

    monkeypatch.setattr(common, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sft.main(argv)
    monkeypatch.undo()


def torchrun(*argv, code=None):
    """Two gloo processes running sft.py (or the Python `code`, given sft.py's arguments)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = ["--no-python", sys.executable, "-c", code] if code else ["sft.py"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *cmd, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# FSDP runs compare weights at 1e-5 (lr is 1e-2): AdamW divides by sqrt(v), so an element whose
# gradient is pure rounding noise moves by a fraction of lr whatever its size, and the order in which
# FSDP's reduce-scatter sums the ranks' gradients decides that noise. On torch 2.11 (an H100 machine)
# it moved one element of 4096 by 1.4e-6, every other one by at most 2.7e-7. A wrong shard or a
# missing reduction moves weights by ~lr; a mean instead of a sum shows in the gradient norm.
FSDP_WEIGHT_TOL = 1e-5


def assert_same_run(a, b, tol=1e-6, weight_tol=1e-6):
    """Same logged loss, aux loss and gradient norm at every step (rel. tol), and the same final
    weights (abs. weight_tol)."""
    a_rows, b_rows = (common.read_metrics(os.path.join(r, "metrics.jsonl")) for r in (a, b))
    for key in ("step", "loss", "aux_loss", "grad_norm"):  # grad_norm: the update is not just Adam-invariant
        assert [r[key] for r in b_rows] == pytest.approx([r[key] for r in a_rows], rel=tol), key
    wa, wb = (load_file(os.path.join(r, "final", "model.safetensors")) for r in (a, b))
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=0, atol=weight_tol), key
    return wa


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(data_dir, tmp_path, parallel):
    """DDP (replicated) and FSDP2 (sharded weights, gradients and AdamW state, --fsdp) both compute
    what one process computes on the same global batch."""
    common_args = ["--steps", 2, "--batch_size", 4, "--seq_len", 96, "--lr", 1e-2, "--warmup", 1]
    sft.main(args(data_dir, tmp_path / "one", *common_args, "--grad_accum", 2))
    run = torchrun(*args(data_dir, tmp_path / "two", *common_args, "--grad_accum", 1,
                         *(["--fsdp"] if parallel == "fsdp" else [])))
    assert run.returncode == 0, run.stderr[-3000:]
    one = assert_same_run(tmp_path / "one", tmp_path / "two",
                          weight_tol=FSDP_WEIGHT_TOL if parallel == "fsdp" else 1e-6)
    torch.manual_seed(0)
    init = Transformer(ModelConfig.from_json(data_dir / "config.json")).hf_state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in one)
    assert moved > 1e-2  # two steps at lr 1e-2 really changed the weights


KILL_AFTER_CHECKPOINT = """
import sys, common, sft
save = common.save_checkpoint
def save_then_die(path, *a, **k):
    save(path, *a, **k)
    if path.endswith("last"):
        sys.exit(3)
common.save_checkpoint = save_then_die
sft.main(sys.argv[1:])
"""


def test_fsdp_checkpoints_resume_with_and_without_fsdp(data_dir, tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint resumes to the same result whichever way it is run:
    written by 2 FSDP ranks (gathered: a full model and optimizer) and resumed by one process, and
    written by one process and resumed by 2 FSDP ranks (each keeps its shard of the optimizer)."""
    run = ["--steps", 4, "--batch_size", 4, "--seq_len", 96, "--lr", 1e-2, "--warmup", 1, "--save_every", 2]
    sft.main(args(data_dir, tmp_path / "straight", *run, "--grad_accum", 2))

    killed = torchrun(*args(data_dir, tmp_path / "fsdp_then_one", *run, "--fsdp"), code=KILL_AFTER_CHECKPOINT)
    assert killed.returncode != 0 and (tmp_path / "fsdp_then_one" / "last" / "optimizer.safetensors").exists()
    assert not (tmp_path / "fsdp_then_one" / "final").exists()
    sft.main(args(data_dir, tmp_path / "fsdp_then_one", *run, "--grad_accum", 2))
    assert_same_run(tmp_path / "straight", tmp_path / "fsdp_then_one", weight_tol=FSDP_WEIGHT_TOL)

    run_killed_after_checkpoint(monkeypatch, args(data_dir, tmp_path / "one_then_fsdp", *run, "--grad_accum", 2))
    resumed = torchrun(*args(data_dir, tmp_path / "one_then_fsdp", *run, "--fsdp"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "one_then_fsdp", weight_tol=FSDP_WEIGHT_TOL)


def test_resume_is_bit_exact(data_dir, tmp_path, monkeypatch):
    run = ["--steps", 6, "--batch_size", 4, "--seq_len", 96, "--lr", 3e-3, "--warmup", 2]
    summary = sft.main(args(data_dir, tmp_path / "straight", *run))
    # the run crosses an epoch boundary (a new permutation), and some conversations were cut
    assert summary["rows"] < 6 * 4 and summary["truncated"] > 0

    run_killed_after_checkpoint(monkeypatch, args(data_dir, tmp_path / "resumed", *run, "--save_every", 3))
    assert len(losses(tmp_path / "resumed")) == 3
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    write_jsonl(tmp_path / "fewer.jsonl", conversations(6))   # other data: the position means nothing
    with pytest.raises(ValueError, match=r"resumed/last was written for SFT data of \d+ packed rows"):
        sft.main(args(data_dir, tmp_path / "resumed", *run, "--save_every", 3, "--sft_file", tmp_path / "fewer.jsonl"))
    assert sft.main(args(data_dir, tmp_path / "resumed", *run, "--save_every", 3))["loss"] == summary["loss"]

    rows = common.read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # exactly
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rows_too_short_for_any_answer_are_an_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"sft\.jsonl: no assistant token to train on .* --seq_len 8"):
        sft.main(args(data_dir, tmp_path / "out", "--seq_len", 8))


def test_malformed_jsonl_names_file_and_line(data_dir, tmp_path):
    good = json.dumps(conversations(1)[0])
    for bad, why in [('{"messages": [', "invalid JSON"),
                     ('{"messages": [{"role": "user"}]}', "content")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{why}"):
            sft.main(args(data_dir, tmp_path / "out", "--sft_file", path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_on_cuda(data_dir, tmp_path):
    summary = sft.main(args(data_dir, tmp_path, "--steps", 20, "--batch_size", 4, "--seq_len", 128,
                            "--lr", 3e-3, "--warmup", 2, "--device", "cuda"))
    curve = losses(tmp_path)
    assert all(l == l for l in curve) and curve[-1] < curve[0] and summary["tokens_per_s"] > 0
