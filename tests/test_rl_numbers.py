"""Where every number of an RL update comes from, pinned against references written out by hand in
float64 (a float64 copy of the model, one sample at a time, no micro-batches, no ranks):
- GRPO's token-level mean and MOPD's mean over responses are over the *global* batch: however the
  samples fall into micro-batches and onto ranks (two gloo processes with different token counts);
- MOPD scores each domain's tokens with that domain's teacher, never another's or an average;
- MOPD's advantage is taken against the trainer's own logprobs, not the engine's sampling ones."""

import argparse
import copy
import os
import random
import socket
import subprocess
import sys

import torch

import common
import grpo
import mopd
import rl
from model import ModelConfig, Transformer
from rollout import Sample

TOY = dict(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
           norm_topk_prob=True, max_position_embeddings=64)
DOMAINS = ["a", "b"]
HERE = os.path.dirname(os.path.abspath(__file__))


def toy_model(seed):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict(TOY))


def toy_samples(n=6, seed=0):
    """Samples of very different lengths (1 to 9 response tokens), with engine logprobs that differ
    from the trainer's, alternating domains a, b."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 16) for _ in range(rng.randint(2, 4))]
        response = [rng.randrange(1, 16) for _ in range(1 + (i * 5) % 9)]
        out.append(Sample(prompt, response, [-rng.uniform(0.5, 3.0) for _ in response], [1] * len(response), "stop"))
    return out, [DOMAINS[i % 2] for i in range(n)]


def toy_run(model, domains=DOMAINS):
    params = [p for p in model.parameters() if p.requires_grad]
    return rl.Run(dist=common.init_distributed("cpu"), model=model, tok=argparse.Namespace(token_to_id=lambda s: 0),
                  tok_path="", optimizer=torch.optim.SGD(params, lr=0.0), params=params, engine=None, pools={},
                  domains=list(domains), mix=[], bf16=False, logger=None)


ARGS = argparse.Namespace(out="toy", micro_batch=2, epochs=1, clip_low=0.2, clip_high=0.28, freeze_router=True,
                          temperature=1.0, grad_clip=0.0, mismatch_low=0.0, mismatch_high=1e9)


def response_logprobs(model, s):
    """log pi(y_t | s_t) of a sample's response tokens: one full forward of that sample alone."""
    ids = torch.tensor([s.prompt_ids + s.token_ids])
    logits = model(ids)[0][0, len(s.prompt_ids) - 1:-1]
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def grpo_reference(model, samples, advantages):
    """-(1 / sum_i |o_i|) sum_i A_i sum_t log pi(o_i,t): REINFORCE as a token-level mean."""
    m = copy.deepcopy(model).double()
    n = sum(len(s.token_ids) for s in samples)
    loss = -sum(a * response_logprobs(m, s).sum() for s, a in zip(samples, advantages.tolist())) / n
    loss.backward()
    return grads(m)


def mopd_reference(model, samples, domains, teachers):
    """-(1/N) sum_y (1/|V(y)|) sum_t w_t sg(a_t) log pi_train, a_t = log pi_teacher(domain) -
    log pi_train, w_t = sg(pi_train / pi_inf) (the window here keeps every token): each response's
    token mean, averaged over the N responses."""
    m = copy.deepcopy(model).double()
    teachers64 = {d: copy.deepcopy(t).double() for d, t in teachers.items()}
    loss = 0.0
    for s, d in zip(samples, domains):
        lp = response_logprobs(m, s)
        with torch.no_grad():
            a = response_logprobs(teachers64[d], s) - lp.detach()
        w = torch.exp(lp.detach() - torch.tensor(s.logprobs, dtype=torch.float64))
        loss = loss - (w * a * lp).sum() / len(s.token_ids) / len(samples)
    loss.backward()
    return grads(m)


def grpo_grads(model, samples, advantages):
    model = copy.deepcopy(model)
    grpo.update(toy_run(model), ARGS, samples, advantages.float(), list(range(len(samples))))
    return grads(model)


def mopd_grads(model, samples, domains, teachers):
    model = copy.deepcopy(model)
    mopd.update(toy_run(model), ARGS, samples, domains, teachers)
    return grads(model)


def assert_same(got, want):
    assert (got - want).norm() <= 1e-5 * want.norm() and want.norm() > 0, ((got - want).norm(), want.norm())


def test_grpo_token_mean_is_over_the_global_batch():
    samples, _ = toy_samples()
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.75], dtype=torch.float64)
    model = toy_model(0)
    assert_same(grpo_grads(model, samples, advantages), grpo_reference(model, samples, advantages))


def test_mopd_each_domain_its_teacher_advantage_against_the_trainer():
    samples, domains = toy_samples()
    model, teachers = toy_model(0), {"a": toy_model(1), "b": toy_model(2)}
    for t in teachers.values():
        t.eval().requires_grad_(False)
    want = mopd_reference(model, samples, domains, teachers)
    assert_same(mopd_grads(model, samples, domains, teachers), want)
    # the references tell the wrong versions apart: swapped teachers are another gradient
    swapped = mopd_reference(model, samples, domains, {"a": teachers["b"], "b": teachers["a"]})
    assert (swapped - want).norm() > 1e-2 * want.norm()


WORKER = """
import sys, torch
sys.path.insert(0, {here!r})
import test_rl_numbers as t, common
d = common.init_distributed("cpu")
samples, domains = t.toy_samples()
share = [i for i in range(len(samples)) if (i < 4) == (d.rank == 0)]   # rank 0: 4 samples, rank 1: 2
model, teachers = t.toy_model(0), {{"a": t.toy_model(1).eval(), "b": t.toy_model(2).eval()}}
advantages = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.75])
g = t.grpo_grads(model, [samples[i] for i in share], advantages[share])
m = t.mopd_grads(model, [samples[i] for i in share], [domains[i] for i in share], teachers)
torch.save(dict(grpo=g, mopd=m), {out!r} + str(d.rank))
torch.distributed.destroy_process_group()
"""


def test_two_ranks_with_different_token_counts(tmp_path):
    """Rank 0 holds 4 samples (15 response tokens), rank 1 two (14): each divides by the global
    count, GRPO's 29 tokens and MOPD's 6 responses, and the summed gradients are the one-process
    reference's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(here=HERE, out=out)], cwd=os.path.dirname(HERE),
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    samples, domains = toy_samples()
    model, teachers = toy_model(0), {"a": toy_model(1).eval(), "b": toy_model(2).eval()}
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.75], dtype=torch.float64)
    want = dict(grpo=grpo_reference(model, samples, advantages), mopd=mopd_reference(model, samples, domains, teachers))
    for r in range(2):
        got = torch.load(out + str(r))
        for key in want:
            assert_same(got[key], want[key])
