"""Tests for rollout.py, model_runner.py and kernels/paged_attention.py, on the tiny config with
random weights.

The reference for everything the engine returns is the training forward without any cache: the
whole sequence so far through `model(ids)`, once per new token. Exact-token comparisons (greedy)
run the model in float64, so that two mathematically equal computations cannot flip an argmax on
a near-tie; the logprob comparisons run in float32, the dtype RL trains in, at fp32 tolerance.
"""
import copy
import dataclasses
import gc
import math
import os
import weakref

import pytest
import torch

from kernels.paged_attention import paged_decode_attention_torch, paged_decode_attention_triton
from kernels.sampling import draw_triton
from model import ModelConfig, Transformer
import model_runner
from model_runner import ModelRunner
import rollout
from rollout import Engine, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig.from_json(os.path.join(ROOT, "configs", "tiny.json"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return Transformer(CONFIG).double()


@pytest.fixture(scope="module")
def model32():
    torch.manual_seed(1)
    return Transformer(CONFIG)


@pytest.fixture(scope="module")
def model32_v256():
    """A 256-token vocabulary: the sampler tests also run the Triton sampler, whose interpreted
    cost grows with the vocabulary."""
    torch.manual_seed(2)
    return Transformer(dataclasses.replace(CONFIG, vocab_size=256))


def make_prompts(lengths, seed, vocab_size=CONFIG.vocab_size):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_reference(model, ids, num_new):
    """Greedy decoding with no cache at all: a full forward over the whole sequence per token."""
    ids = list(ids)
    for _ in range(num_new):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[-num_new:]


@torch.no_grad()
def training_logits(model, prompt, tokens):
    """Logits that predicted each of `tokens`, from one uncached forward over prompt + tokens."""
    logits, _ = model(torch.tensor([prompt + tokens], device=next(model.parameters()).device))
    return logits[0, len(prompt) - 1:-1].double()


def test_greedy_equals_uncached_recomputation(model64):
    prompts = make_prompts([1, 5, 16, 17, 40], seed=0)
    # block_size 4 makes sequences span many blocks; a budget of 24 tokens per step forces chunked
    # prefill (the 40-token prompt takes two steps) and steps that mix prefill and decode.
    engine = Engine(model64, block_size=4, max_batch_tokens=24)
    model64.train()
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    assert model64.training, "generate must restore the model's train mode"
    for prompt, (s,) in zip(prompts, out):
        assert s.prompt_ids == prompt and s.finish_reason == "length" and s.gen_mask == [1] * 10
        assert s.token_ids == greedy_reference(model64, prompt, 10)
        # greedy returns the model's log-softmax of the chosen token
        expected = training_logits(model64, prompt, s.token_ids).log_softmax(-1)
        expected = expected.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), expected)


def test_a_step_may_hold_more_tokens_than_one_sequence_may():
    """A step flattens all its sequences into one row with per-token positions, so the row can be
    longer than max_position_embeddings, which bounds each sequence only."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(CONFIG, max_position_embeddings=40)).double()
    prompts = make_prompts([30, 25, 33], seed=5)
    out = Engine(model, block_size=4).generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    for prompt, group in zip(prompts, out):
        assert group[0].token_ids == greedy_reference(model, prompt, 6)


def test_a_full_token_budget_does_not_stop_bursts(model64):
    """With max_batch_tokens running sequences, a waiting one cannot join (the decodes take the whole
    budget), so the running ones decode in bursts rather than one step per host sync."""
    prompts = make_prompts([3] * 8, seed=9)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    engine = Engine(model64, block_size=4, max_batch_tokens=4, decode_burst=4)
    single_steps = []
    step = engine._step
    def counting_step(waiting, running, *args):
        if waiting and len(running) >= 4 and all(len(s.tokens) - s.num_cached == 1 for s in running):
            single_steps.append(len(running))   # a pure decode step that a burst could have run
        step(waiting, running, *args)
    engine._step = counting_step
    out = engine.generate(prompts, params)
    assert single_steps == [] and engine.stats["bursts"] > 0
    assert out == Engine(model64, block_size=4).generate(prompts, params)


def test_stop_token_ends_a_sequence(model64):
    prompt = make_prompts([7], seed=1)[0]
    free_run = greedy_reference(model64, prompt, 8)
    stop = free_run[3]
    (s,), = Engine(model64, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop,)))
    assert s.finish_reason == "stop" and s.token_ids == free_run[:free_run.index(stop) + 1]


def test_stop_string_ends_a_sequence_at_the_token_that_completes_it(model64):
    """Sampled (a random model's greedy text repeats one token), so the reference is the same seed's
    run without stop strings: the same draws up to where the stop string must end it."""
    prompt = make_prompts([7], seed=1)[0]
    decode = lambda ids: "".join(f"<{i}>" for i in ids)   # a stand-in tokenizer: every id is text

    def run(stops, hook=(), env_hook=None):
        params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_strings=stops, hook_token_ids=hook)
        return Engine(model64, block_size=4).generate([prompt], params, seed=3, env_hook=env_hook,
                                                      decode=decode)[0][0]
    free = run(()).token_ids
    stop = decode(free[5:7])[2:-2]   # from inside token 5 to inside token 6: completed by token 6
    s = run(("no such text", stop))
    first = next(k for k in range(1, 13) if stop in decode(free[:k]))
    assert first <= 7 and s.finish_reason == "stop" and s.token_ids == free[:first]
    # text that was already there before the last token does not stop it again: an environment's
    # reply containing the stop string is appended after token 0, and generation goes on past it
    reply = lambda i, j, ids: free[5:7] if len(ids) == 1 else None
    free_hooked, s = (run(stops, (free[0],), reply) for stops in ((), (stop,)))
    assert s.gen_mask[:3] == [1, 0, 0] and stop in decode(s.token_ids[:3])
    new = [k for k in range(4, len(free_hooked.token_ids) + 1)   # occurrences completed by a sampled token
           if decode(free_hooked.token_ids[:k]).count(stop) > decode(free_hooked.token_ids[:k - 1]).count(stop)]
    assert s.token_ids == free_hooked.token_ids[:new[0] if new else None] and len(s.token_ids) > 3
    with pytest.raises(ValueError, match="decode"):
        Engine(model64).generate([prompt], SamplingParams(stop_strings=("x",)))


@pytest.mark.parametrize("burst", [1, 4])
def test_prefix_sharing_same_tokens_prompt_prefilled_once(model64, burst):
    # 8 = exactly two blocks (nothing to copy); 6 and 13 end in a partial block (copy-on-write)
    prompts, n, new = make_prompts([6, 8, 13], seed=2), 4, 9
    params = SamplingParams(temperature=0, max_new_tokens=new)
    shared = Engine(model64, block_size=4, decode_burst=burst)
    out = shared.generate(prompts, params, n=n)
    unshared = Engine(model64, block_size=4, decode_burst=burst)
    alone = unshared.generate([p for p in prompts for _ in range(n)], params)
    for i, group in enumerate(out):
        assert len(group) == n
        for j, s in enumerate(group):
            assert s.token_ids == alone[i * n + j][0].token_ids
    # each prompt went through the model once; each sample then fed its own new tokens but the last
    # (the first new token comes from the prefill, the other 8 from 8 bursts of 1 or 2 of 4)
    prompt_tokens = sum(len(p) for p in prompts)
    assert shared.stats["forward_tokens"] == prompt_tokens + len(prompts) * n * (new - 1)
    assert unshared.stats["forward_tokens"] == n * prompt_tokens + len(prompts) * n * (new - 1)
    assert shared.stats["bursts"] == (8 if burst == 1 else 2)
    assert shared.stats["peak_blocks"] < unshared.stats["peak_blocks"]


@pytest.fixture(scope="module")
def varied64():
    """A random model whose greedy text does not just repeat one token (untied, loud LM head), so
    that stop and hook tokens turn up in the middle of responses."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(CONFIG, tie_word_embeddings=False)).double()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


def test_decode_bursts_change_nothing_but_the_schedule(varied64):
    """Greedy, so the schedule cannot matter: steps of one token (decode_burst=1) and bursts of 5 or
    16 give the same samples, with stop tokens, tool calls and max_new_tokens landing inside a
    burst, and with a pool so tight that bursts preempt; and the same with each burst launched
    before the last was read (overlap, a GPU's default), where those land inside a burst already
    running."""
    prompts = make_prompts([3, 7, 12, 20, 9], seed=8)
    free = [greedy_reference(varied64, p, 24) for p in prompts]
    stop, hook = free[1][6], free[3][4]   # each ends some responses mid-burst
    calls = []

    def env_hook(i, j, ids):   # the first hook of each sample gets a 3-token reply
        calls.append((i, j))
        return [5, 6, 7] if calls.count((i, j)) == 1 else None
    params = SamplingParams(temperature=0, max_new_tokens=23, stop_token_ids=(stop,), hook_token_ids=(hook,))
    runs = {}
    for burst, blocks, overlap in [(1, None, False), (1, None, True), (5, None, False), (5, None, True),
                                   (16, None, True), (5, 40, True)]:
        calls.clear()
        engine = Engine(varied64, block_size=4, num_blocks=blocks, decode_burst=burst, overlap=overlap)
        runs[burst, blocks, overlap] = engine.generate(prompts, params, n=2, env_hook=env_hook), dict(engine.stats)
        assert sorted(engine.alloc.free) == list(range(1, engine.runner.k_cache.shape[1]))
    reference, stats = runs[1, None, False]
    assert {s.finish_reason for g in reference for s in g} == {"stop", "length"}
    assert any(0 in s.gen_mask for g in reference for s in g)   # a tool reply was appended somewhere
    for key, (out, stats) in runs.items():
        assert stats["bursts"] > 0 and (stats["ahead"] > 0) == key[2]   # ahead: launched before the last was read
        for g_ref, g in zip(reference, out):
            for a, b in zip(g_ref, g):
                assert (b.token_ids, b.gen_mask, b.finish_reason) == (a.token_ids, a.gen_mask, a.finish_reason), key
                torch.testing.assert_close(b.logprobs, a.logprobs)
    assert runs[5, 40, True][1]["preemptions"] > 0


@pytest.mark.parametrize("burst,blocks,overlap", [(1, None, False), (5, None, True), (16, 12, True)])
def test_every_path_is_greedy_and_on_policy_on_this_device(varied64, burst, blocks, overlap):
    """The engine as it runs on this machine's device (on a GPU: the Triton kernels, CUDA graphs,
    bursts launched before the last is read), with stop and tool tokens inside bursts and, with
    12 blocks of 16 tokens, a pool that preempts: each sample is checked against one training
    forward over it. Every generated token is that forward's argmax (up to fp32 rounding: the
    kernels sum in another order), with its log-softmax as logprob, and every appended token is
    the tool's reply, with logprob 0."""
    model = copy.deepcopy(varied64).float().to(DEVICE)
    prompts = make_prompts([3, 7, 12, 20, 9], seed=8)
    free = Engine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
    stop = free[1][0].token_ids[6]   # these two end some responses mid-burst
    hook = next(t for t in free[3][0].token_ids[4:] if t != stop)
    calls = []

    def env_hook(i, j, ids):   # the first hook of each sample gets a 3-token reply
        calls.append((i, j))
        return [5, 6, 7] if calls.count((i, j)) == 1 else None
    params = SamplingParams(temperature=0, max_new_tokens=23, stop_token_ids=(stop,), hook_token_ids=(hook,))
    engine = Engine(model, num_blocks=blocks, decode_burst=burst, overlap=overlap)
    out = engine.generate(prompts, params, n=2, env_hook=env_hook)
    assert engine.stats["graph_steps"] > 0 if DEVICE == "cuda" else engine.stats["graph_steps"] == 0
    assert (engine.stats["ahead"] > 0) == overlap and (engine.stats["preemptions"] > 0) == (blocks is not None)
    assert {s.finish_reason for g in out for s in g} == {"stop", "length"}
    assert any(0 in s.gen_mask for g in out for s in g)   # a tool reply was appended somewhere
    for prompt, group in zip(prompts, out):
        for s in group:
            logits = training_logits(model, prompt, s.token_ids).cpu()
            taken = torch.tensor(s.token_ids)[:, None]
            gen = torch.tensor(s.gen_mask, dtype=torch.bool)
            assert (logits.gather(1, taken)[:, 0] >= logits.max(-1).values - 1e-4)[gen].all()
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64)[gen],
                                       logits.log_softmax(-1).gather(1, taken)[:, 0][gen], atol=1e-4, rtol=0)
            assert [t for t, m in zip(s.token_ids, s.gen_mask) if not m] in ([], [5, 6, 7])
            assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.gen_mask) if not m)
            assert len(s.token_ids) == 23 if s.finish_reason == "length" else s.token_ids[-1] in (stop, hook)


def keep_mask_reference(logits_T_V, temperature, top_k, top_p):
    """Which tokens the truncated distribution keeps, written independently of rollout.sample."""
    z = logits_T_V / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k:
        keep &= z >= z.sort(-1, descending=True).values[:, top_k - 1:top_k]
    z = z.masked_fill(~keep, float("-inf"))
    if top_p < 1:
        probs_sorted, order = z.softmax(-1).sort(-1, descending=True)
        # the smallest top set whose mass reaches top_p: ranks 0..first rank where cumsum >= top_p
        last_T = torch.searchsorted(probs_sorted.cumsum(-1), torch.full((len(z), 1), top_p, dtype=z.dtype))
        keep_sorted = torch.arange(z.shape[-1]) <= last_T
        keep &= torch.zeros_like(keep).scatter(1, order, keep_sorted)
    return keep


def use_sampler(name, monkeypatch):
    """The engine draws with torch (the CPU's path), or with the Triton kernel it uses on a GPU, with
    the engine's Philox key: on a CPU under the interpreter; on a GPU machine compiled, on the GPU
    (the tests' models are on the CPU: the logits go there, and the key there and back, so that it
    moves on as the engine's own does)."""
    def draw_on_device(logits, t, generator, philox_2):
        key = philox_2.to(DEVICE)
        tokens, logprobs = draw_triton(logits.to(DEVICE), t, key)
        philox_2.copy_(key)
        return tokens.to(logits.device), logprobs.to(logits.device)
    if name == "triton":
        monkeypatch.setattr(rollout, "draw", draw_on_device)


@pytest.mark.parametrize("sampler", ["torch", "triton"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.9),
                                                     (0.8, 50, 0.8)])
def test_logprobs_equal_training_forward(model32_v256, temperature, top_k, top_p, sampler, monkeypatch):
    use_sampler(sampler, monkeypatch)
    prompts = make_prompts([5, 12], seed=3, vocab_size=256)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=16)
    out = Engine(model32_v256, block_size=4).generate(prompts, params, n=3, seed=7)
    for prompt, group in zip(prompts, out):
        for s in group:
            logits = training_logits(model32_v256, prompt, s.token_ids)
            keep = keep_mask_reference(logits, temperature, top_k, top_p)
            taken = torch.tensor(s.token_ids)[:, None]
            assert keep.gather(1, taken).all(), "sampled a token outside the top-k/top-p set"
            expected = (logits / temperature).masked_fill(~keep, float("-inf")).log_softmax(-1)
            got = torch.tensor(s.logprobs, dtype=torch.float64)
            torch.testing.assert_close(got, expected.gather(1, taken)[:, 0], atol=1e-4, rtol=0)
            if (temperature, top_k, top_p) == (1.0, 0, 1.0):   # untruncated: the training log-softmax
                torch.testing.assert_close(got, logits.log_softmax(-1).gather(1, taken)[:, 0],
                                           atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["torch", "triton"])
def test_a_step_that_finishes_no_prompt_samples_nothing(model32_v256, sampler, monkeypatch):
    """A prompt longer than max_batch_tokens is prefilled over several steps, and a step that holds
    only the start of it has no logits to sample from (the Triton sampler, handed no rows, divided
    by zero). The samples that follow are the training forward's, as everywhere."""
    use_sampler(sampler, monkeypatch)
    prompts = make_prompts([40, 5], seed=12, vocab_size=256)
    engine = Engine(model32_v256, block_size=4, max_batch_tokens=16)
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6), n=2, seed=0)
    for prompt, group in zip(prompts, out):
        for s in group:
            assert len(s.token_ids) == 6
            expected = training_logits(model32_v256, prompt, s.token_ids).log_softmax(-1)
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64),
                                       expected.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0],
                                       atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 5, 1.0), (1.4, 0, 0.8)])
def test_sampler_draws_from_the_distribution_whose_logprobs_it_returns(temperature, top_k, top_p):
    """The other half of "strict on-policy": each token is drawn with probability exp(its logprob).
    40,000 draws from one row of logits: every token's frequency is within 5 standard errors of
    exp(logprob) (a wrong temperature or a leaky top-k/top-p is 10+ errors off), and the tokens
    the truncation drops are never drawn."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 40_000
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    tokens, logprobs = rollout.sample(logits.expand(n, -1), params,
                                      torch.Generator().manual_seed(0))
    kept = keep_mask_reference(logits[None].double(), temperature, top_k, top_p)[0]
    expected = (logits.double() / temperature).masked_fill(~kept, float("-inf")).softmax(-1)
    # every draw's logprob is its token's under the truncated distribution (-inf if dropped)
    torch.testing.assert_close(logprobs.double(), expected.log()[tokens], atol=1e-6, rtol=0)
    freq = torch.bincount(tokens, minlength=len(logits)).double() / n
    assert (freq[~kept] == 0).all(), "drew a token outside the top-k/top-p set"
    stderr = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * stderr + 1e-12).all(), (freq, expected)


@pytest.mark.parametrize("sampler", ["torch", "triton"])
def test_same_seed_same_samples(model32_v256, sampler, monkeypatch):
    use_sampler(sampler, monkeypatch)
    prompts = make_prompts([4, 9, 3], seed=4, vocab_size=256)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12)
    engine = Engine(model32_v256, block_size=4)
    def tokens(seed):
        return [[s.token_ids for s in g] for g in engine.generate(prompts, params, n=2, seed=seed)]

    first = tokens(seed=5)
    assert tokens(seed=5) == first
    assert tokens(seed=6) != first
    assert first[0][0] != first[0][1], "the samples of one prompt should differ"


def test_generate_under_bf16_autocast(model32, monkeypatch):
    # a stage may call the engine inside its bf16 autocast: prefill (SDPA, bf16 out) and decode must
    # write into the same attention output whatever dtype each path returns; and decode steps run
    # eagerly then, since a graph would replay casts into weight copies that autocast frees
    monkeypatch.setattr(ModelRunner, "_graph_of", lambda self, step: EagerGraph(step))
    engine = Engine(model32, block_size=16, cuda_graphs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine.generate(make_prompts([5, 17], seed=3), SamplingParams(temperature=1.0, max_new_tokens=6),
                              n=2, seed=0)
    assert engine.stats["graph_steps"] == 0 and not engine.runner.graphs
    lengths = [len(s.token_ids) for group in out for s in group]
    assert len(lengths) == 4 and all(n == 6 for n in lengths)
    assert all(math.isfinite(lp) and lp <= 0 for group in out for s in group for lp in s.logprobs)


def test_no_block_leaks_over_thousands_of_sequences(model32):
    g = torch.Generator().manual_seed(5)
    prompts = make_prompts(torch.randint(1, 12, (1500,), generator=g).tolist(), seed=5)
    engine = Engine(model32, block_size=4, num_blocks=600, max_seqs=256, max_batch_tokens=1024)
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=3), n=2, seed=0)
    assert sum(len(g) for g in out) == 3000 and all(len(s.token_ids) == 3 for g in out for s in g)
    assert sorted(engine.alloc.free) == list(range(1, 600)) and not any(engine.alloc.ref_count)
    assert engine.stats["peak_blocks"] > 300   # the pool really was busy


def test_preemption_gives_the_same_greedy_result(model64):
    prompts = make_prompts([5, 9, 14, 7, 11, 3], seed=6)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    roomy = Engine(model64, block_size=4)
    expected = roomy.generate(prompts, params, n=2)
    assert roomy.stats["preemptions"] == 0
    tight = Engine(model64, block_size=4, num_blocks=14)   # 13 usable blocks of 4 tokens
    got = tight.generate(prompts, params, n=2)
    assert tight.stats["preemptions"] > 0
    for g_exp, g_got in zip(expected, got):
        for a, b in zip(g_exp, g_got):
            assert b.token_ids == a.token_ids
            torch.testing.assert_close(b.logprobs, a.logprobs)
    assert sorted(tight.alloc.free) == list(range(1, 14))


def test_tool_response_is_masked_and_continuation_equals_recomputation(model64):
    prompt = make_prompts([10], seed=7)[0]
    free_run = greedy_reference(model64, prompt, 6)
    hook = free_run[2]
    k = free_run.index(hook)     # the first time the model emits the hook token
    tool_response = [11, 12, 13, 14, 15]
    calls = []

    def env_hook(prompt_index, sample_index, token_ids_so_far):
        calls.append((prompt_index, sample_index, list(token_ids_so_far)))
        return tool_response if len(calls) <= 2 else None   # one tool turn per sample

    params = SamplingParams(temperature=0, max_new_tokens=20, hook_token_ids=(hook,))
    out = Engine(model64, block_size=4).generate([prompt], params, n=2, env_hook=env_hook)
    assert sorted(calls[:2]) == [(0, 0, free_run[:k + 1]), (0, 1, free_run[:k + 1])]
    for s in out[0]:
        turn = k + 1 + len(tool_response)
        assert s.token_ids[:turn] == free_run[:k + 1] + tool_response
        rest = s.token_ids[turn:]
        assert s.gen_mask == [1] * (k + 1) + [0] * len(tool_response) + [1] * len(rest)
        assert s.logprobs[k + 1:turn] == [0.0] * len(tool_response)
        assert len(rest) > 0 and rest == greedy_reference(model64, prompt + s.token_ids[:turn], len(rest))
        expected = training_logits(model64, prompt, s.token_ids).log_softmax(-1)
        expected = expected.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
        gen = torch.tensor(s.gen_mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64)[gen], expected[gen])
        assert s.finish_reason == ("length" if len(s.token_ids) == 20 else "stop")


@pytest.mark.triton
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 32), (8, 1, 64), (6, 6, 16)])
def test_triton_paged_attention_equals_torch(Hq, Hkv, D):
    """Both paths write the new tokens' k/v (strided views) to the slots of their positions and
    attend over the whole context, the new token included: equal outputs, equal pools afterwards,
    and the torch path equal to a plain per-sequence softmax attention. Contexts: 1 (only the new
    token), a block, a block and one, and up to all M blocks (three of the kernel's 64-token
    chunks, the last partial)."""
    g = torch.Generator().manual_seed(Hq * D)
    S, block_size, num_blocks, M = 5, 16, 50, 9
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g)
    positions = torch.tensor([0, 15, 16, 44, 143])   # contexts of 1, 16, 17, 45, 144 tokens
    block_tables = torch.randperm(num_blocks, generator=g)[:S * M].view(S, M).int()   # no block shared
    slots = block_tables.long()[torch.arange(S), positions // block_size] * block_size + positions % block_size
    q = torch.randn(S, Hq, D, generator=g)
    # strided new k/v, as views of a fused projection's output are
    k_new, _, v_new = torch.randn(S, 3, Hkv, D, generator=g).unbind(1)
    k64, v64 = k_cache.double(), v_cache.double()
    expected = paged_decode_attention_torch(q.double(), k_new.double(), v_new.double(), k64, v64,
                                            block_tables, positions)
    assert torch.equal(k64.flatten(0, 1)[slots], k_new.double())
    # a plain per-sequence softmax attention, to pin the torch path itself
    for s in range(S):
        n = int(positions[s]) + 1
        rows = (block_tables[s].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        k = k64.flatten(0, 1)[rows].repeat_interleave(Hq // Hkv, dim=1)   # [n, Hq, D]
        v = v64.flatten(0, 1)[rows].repeat_interleave(Hq // Hkv, dim=1)
        w = (torch.einsum("hd,nhd->hn", q[s].double(), k) / D ** 0.5).softmax(-1)
        torch.testing.assert_close(expected[s], torch.einsum("hn,nhd->hd", w, v))
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    k_dev, v_dev = dev(k_cache), dev(v_cache)
    got = paged_decode_attention_triton(dev(q), dev(k_new), dev(v_new), k_dev, v_dev, dev(block_tables),
                                        dev(positions))
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_dev.cpu().double(), k64)
    torch.testing.assert_close(v_dev.cpu().double(), v64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_paged_attention_bf16():
    """On the GPU, with a bf16 pool, the kernel's dots run on the tensor cores in bf16 (the
    probabilities rounded to bf16 for the second, as FlashAttention does): within bf16 rounding of
    an fp64 attention over the same bf16 values, at a rollout's shapes (contexts up to 384)."""
    g = torch.Generator().manual_seed(0)
    S, Hq, Hkv, D, bs, M = 64, 8, 2, 64, 16, 24
    num_blocks = S * M + 1
    k_cache, v_cache = (torch.randn(num_blocks, bs, Hkv, D, generator=g).bfloat16() for _ in range(2))
    positions = torch.randint(0, M * bs, (S,), generator=g)
    block_tables = (torch.randperm(num_blocks - 1, generator=g)[:S * M] + 1).view(S, M).int()
    q, k_new, v_new = (torch.randn(S, H, D, generator=g).bfloat16() for H in (Hq, Hkv, Hkv))
    expected = paged_decode_attention_torch(q.double(), k_new.double(), v_new.double(), k_cache.double(),
                                            v_cache.double(), block_tables, positions)
    k_dev, v_dev = k_cache.cuda(), v_cache.cuda()
    got = paged_decode_attention_triton(q.cuda(), k_new.cuda(), v_new.cuda(), k_dev, v_dev,
                                        block_tables.cuda(), positions.cuda())
    assert got.dtype == torch.bfloat16
    # (a CPU emulation of the kernel's roundings at these shapes and seed is off by at most 4.7e-3)
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-2, rtol=0)
    slots = block_tables.long()[torch.arange(S), positions // bs] * bs + positions % bs
    assert torch.equal(k_dev.flatten(0, 1)[slots.cuda()].cpu(), k_new)
    assert torch.equal(v_dev.flatten(0, 1)[slots.cuda()].cpu(), v_new)


def test_engine_with_triton_decode_kernel_equals_torch_path(model64, monkeypatch):
    """The engine's greedy tokens and logprobs are the same with the Triton decode kernel (which also
    writes the decode tokens' k/v to the pool) as with the torch path (block_size 16, as the kernel
    requires). On a CPU the kernel runs under the interpreter, in fp32 math on the fp64 model's
    q/k/v and pool; on a GPU on the fp32 model in CUDA, as the engine runs it."""
    model = model64 if DEVICE == "cpu" else copy.deepcopy(model64).float().to(DEVICE)
    prompts, params = make_prompts([3, 20], seed=8), SamplingParams(temperature=0, max_new_tokens=10)
    calls = []

    def triton_path(q, k, v, *pool_and_tables):
        calls.append(1)
        return paged_decode_attention_triton(q.float(), k.float(), v.float(), *pool_and_tables).to(q.dtype)
    monkeypatch.setattr(model_runner, "paged_decode_attention", paged_decode_attention_torch)
    expected = Engine(model, decode_burst=4).generate(prompts, params, n=2)
    monkeypatch.setattr(model_runner, "paged_decode_attention", triton_path)
    got = Engine(model, decode_burst=4).generate(prompts, params, n=2)
    assert calls
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: made from the step it would capture (after the warm-up
    run), `replay` runs that step again."""
    def __init__(self, step):
        step()
        self.replay = step


@pytest.mark.parametrize("overlap", [False, True])
def test_the_graph_path_on_the_cpu(model32_v256, monkeypatch, overlap):
    """The engine's CUDA-graph path, run on the CPU with a stand-in graph that replays its step
    eagerly: 6 sequences padded to a graph of 8 (the padding rows write the null block), buffers
    reused across bursts and calls, and the warm-up draw not moving the call's random numbers. It
    gives the tokens and logprobs of the eager path, with the Triton sampler (the GPU's), and the
    second call, which captures nothing, gives them again; with bursts overlapped or not."""
    use_sampler("triton", monkeypatch)
    monkeypatch.setattr(ModelRunner, "_graph_of", lambda self, step: EagerGraph(step))
    prompts = make_prompts([5, 9, 3], seed=11, vocab_size=256)
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    eager = Engine(model32_v256, block_size=4, decode_burst=4, cuda_graphs=False, overlap=overlap)
    graphed = Engine(model32_v256, block_size=4, decode_burst=4, cuda_graphs=True, overlap=overlap)
    want = eager.generate(prompts, params, n=2, seed=3)
    for call in range(2):
        got = graphed.generate(prompts, params, n=2, seed=3)
        assert graphed.stats["graph_steps"] == graphed.stats["steps"] - 1 > 0   # all but the prefill
        assert list(graphed.runner.graphs) == [(8, 4, 1.0, 0, 1.0)]
        for g_want, g_got in zip(want, got):
            for a, b in zip(g_want, g_got):
                assert a.token_ids == b.token_ids, call
                # (the graph's tables are as wide as max_position_embeddings allows, the eager ones
                # as wide as the burst needs: the torch attention sums over other padding)
                torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_dropped_engine_is_freed_at_once(model32, monkeypatch, cuda_graphs):
    """An engine makes no reference cycle, not even through its captured graphs: dropping it frees
    its KV pool at once, without waiting for the cycle collector. (The RL stages build engines for
    teachers and checkpoints; a pool kept alive would shrink the next one's, on a GPU half the free
    memory.) The stand-in graph, like a real one, keeps no Python object: it replays nothing."""
    class Graph:
        def __init__(self, step):
            step()
            self.replay = lambda: None
    monkeypatch.setattr(ModelRunner, "_graph_of", lambda self, step: Graph(step))
    engine = Engine(model32, block_size=4, decode_burst=4, cuda_graphs=cuda_graphs)
    engine.generate(make_prompts([5, 3], seed=1), SamplingParams(max_new_tokens=9), n=2)
    assert bool(engine.runner.graphs) == cuda_graphs
    alive, pool = weakref.ref(engine), weakref.ref(engine.runner.k_cache)
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        del engine
        assert alive() is None and pool() is None
    finally:
        if gc_was_on:
            gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (1.0, 0.9)])
def test_cuda_graph_decode_equals_eager(temperature, top_p):
    """A graph replays the eager step exactly, sampling included: the Triton sampler's random key
    is on the device, so graphed and eager runs draw the same numbers, and the draws made while
    capturing do not shift the call's (the second call, which captures nothing, agrees)."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).cuda()
    # 16 sequences, a graph's size, so that both paths run the same shapes (cuBLAS may sum another
    # way for 15 rows than for 16 padded ones, and this compares to the last bit)
    prompts = make_prompts([3, 20, 33, 7], seed=9)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=24)
    eager = Engine(model, cuda_graphs=False).generate(prompts, params, n=4, seed=4)
    engine = Engine(model, cuda_graphs=True)
    graphed = engine.generate(prompts, params, n=4, seed=4)
    assert engine.stats["graph_steps"] > 0 and engine.runner.graphs
    again = engine.generate(prompts, params, n=4, seed=4)
    for a, b, c in zip(eager, graphed, again):
        assert [s.token_ids for s in a] == [s.token_ids for s in b] == [s.token_ids for s in c]
        for sa, sb in zip(a, b):
            torch.testing.assert_close(sa.logprobs, sb.logprobs)
