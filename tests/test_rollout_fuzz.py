"""Randomized tests of the rollout engine's scheduler (rollout.py).

The engine's settings (block size, pool size, token budget, max_seqs, decode bursts, overlap) only
change *when* each token is computed: which step, which burst, whether a sequence was preempted and
recomputed, whether its prompt was prefilled in chunks. Greedy decoding of a float64 model cannot
see the schedule, so for a random configuration and a random workload (prompts, samples per prompt,
stop tokens, stop strings, tool calls) the samples must equal those of a roomy default Engine. A
sampled run (temperature 1) cannot be compared token by token, so there we check what holds for any
schedule: logprobs equal the training forward's, tool replies are masked, no block leaks.
A failure prints the seed and the drawn configuration: rerun that seed to reproduce it.
"""
import random

import pytest
import torch

from model_runner import ModelRunner
from rollout import Engine, SamplingParams
from test_rollout import EagerGraph, make_prompts, training_logits, varied64  # noqa: F401 (a fixture)

GREEDY_SEEDS = range(16)
SAMPLED_SEEDS = range(100, 104)


def decode(ids):   # a stand-in tokenizer for stop strings: every id is its own piece of text
    return "".join(f"<{i}>" for i in ids)


def draw_workload(rng, model, temperature):
    """Prompts, n and SamplingParams. Stop and hook tokens are drawn from the prompts' greedy
    responses, so that they really turn up in the middle of responses (and tool replies too)."""
    prompts = make_prompts([rng.randint(1, 40) for _ in range(rng.randint(1, 5))], seed=rng.randrange(10**6))
    max_new_tokens = rng.randint(1, 24)
    free = Engine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    free_tokens = [t for group in free for s in group for t in s.token_ids]
    stop_strings = ()
    if rng.random() < 0.3 and len(free_tokens) > 1:   # from inside one token's text to inside the next's
        k = rng.randrange(len(free_tokens) - 1)
        stop_strings = (decode(free_tokens[k:k + 2])[2:-2],)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                            stop_token_ids=tuple(rng.choices(free_tokens, k=rng.choice([0, 0, 1, 2]))),
                            stop_strings=stop_strings,
                            hook_token_ids=tuple(rng.choices(free_tokens, k=rng.choice([0, 1, 1]))))
    return prompts, rng.randint(1, 3), params, free_tokens


def draw_engine_config(rng, longest, n):
    """Engine settings from tight to roomy. The pool must hold one sequence of the longest length
    (else generate refuses, by design); a pool just that big preempts all the time. cuda_graphs runs
    the GPU's decode path (padded rows, reused buffers) with a stand-in graph (EagerGraph)."""
    block_size = rng.choice([1, 2, 4, 16])
    one_sequence = -(-longest // block_size)
    return dict(block_size=block_size,
                num_blocks=1 + one_sequence + rng.choice([0, 1, 3, one_sequence, 10 * one_sequence]),
                max_batch_tokens=rng.choice([1, 2, 5, 16, 8192]), max_seqs=rng.choice([n, n + 1, 4, 512]),
                decode_burst=rng.choice([1, 2, 4, 16]), overlap=rng.random() < 0.5,
                cuda_graphs=rng.random() < 0.3)


def make_env_hook(seed, free_tokens):
    """A tool whose reply depends on (prompt, sample, how many times this sample called it): 0-4
    tokens (none: the sequence stops), which may themselves be stop or hook tokens. -> the hook, and
    the replies it gave, by (prompt, sample)."""
    replies = {}

    def env_hook(i, j, response_ids):
        replies.setdefault((i, j), [])
        r = random.Random(f"{seed}-{i}-{j}-{len(replies[i, j])}")
        reply = r.choices(free_tokens, k=r.choice([0, 1, 2, 4]))
        replies[i, j].append(reply)
        return reply if reply or r.random() < 0.5 else None
    return env_hook, replies


def completes_stop_string(ids, params):
    """Does the last token's text finish an occurrence of a stop string?"""
    text, before = decode(ids), len(decode(ids[:-1]))
    return any(text.find(s, max(0, before - len(s) + 1)) >= 0 for s in params.stop_strings)


def check_structure(out, prompts, n, params, engine, replies, where):
    """What holds for any schedule and any temperature."""
    assert sorted(engine.alloc.free) == list(range(1, engine.runner.k_cache.shape[1])), f"blocks leaked {where}"
    assert not any(engine.alloc.ref_count), f"ref counts not zero {where}"
    assert [len(g) for g in out] == [n] * len(prompts), where
    for i, group in enumerate(out):
        for j, s in enumerate(group):
            ids, mask = s.token_ids, s.gen_mask
            assert s.prompt_ids == prompts[i] and 1 <= len(ids) <= params.max_new_tokens, where
            assert len(s.logprobs) == len(mask) == len(ids) and mask[0] == 1, where
            assert s.finish_reason in ("stop", "length"), where
            assert s.finish_reason == "stop" or len(ids) == params.max_new_tokens, where
            assert all(lp == 0.0 for lp, m in zip(s.logprobs, mask) if not m), where
            appended = [t for t, m in zip(ids, mask) if not m]   # the tool's replies (the last may be cut)
            assert appended == sum(replies.get((i, j), []), [])[:len(appended)], where
            for k in range(len(ids) - 1):   # nothing is generated after a stop; a tool call gets a reply
                if mask[k]:
                    assert ids[k] not in params.stop_token_ids, where
                    assert not (params.stop_strings and completes_stop_string(ids[:k + 1], params)), where
                    assert (ids[k] in params.hook_token_ids) == (mask[k + 1] == 0), where
            if s.finish_reason == "stop":   # ended by a stop token or string, or a tool with no reply
                last = ids[-1]
                assert mask[-1] == 1 and (last in params.stop_token_ids or last in params.hook_token_ids or (
                    params.stop_strings and completes_stop_string(ids, params))), where


def run_fuzz_case(model, seed, temperature, monkeypatch):
    monkeypatch.setattr(ModelRunner, "_graph_of", lambda self, step: EagerGraph(step))
    rng = random.Random(seed)
    prompts, n, params, free_tokens = draw_workload(rng, model, temperature)
    config = draw_engine_config(rng, max(map(len, prompts)) + params.max_new_tokens, n)
    where = f"(seed={seed}: Engine(**{config}), n={n}, {params}, prompt lengths {[len(p) for p in prompts]})"
    runs = []
    for engine in (Engine(model), Engine(model, **config)):
        env_hook, replies = make_env_hook(seed, free_tokens)
        out = engine.generate(prompts, params, n=n, seed=seed, env_hook=env_hook, decode=decode)
        check_structure(out, prompts, n, params, engine, replies, where)
        runs.append(out)
    return prompts, params, runs, where


@pytest.mark.parametrize("seed", GREEDY_SEEDS)
def test_any_schedule_gives_the_roomy_engines_greedy_samples(varied64, seed, monkeypatch):
    _, _, (expected, got), where = run_fuzz_case(varied64, seed, 0.0, monkeypatch)
    for g_exp, g_got in zip(expected, got):
        for a, b in zip(g_exp, g_got):
            assert (b.token_ids, b.gen_mask, b.finish_reason) == (a.token_ids, a.gen_mask, a.finish_reason), where
            torch.testing.assert_close(b.logprobs, a.logprobs, msg=lambda m: f"{m}\n{where}")


def test_a_prompt_finished_by_a_burst_still_forks_its_samples(varied64):
    """Found by the fuzz tests (greedy seeds 3, 5, 6, 9, 11, sampled 103): a prompt prefilled in chunks
    with one token left looks like a decoding sequence to Engine._can_burst, and a burst samples its
    first token, but only _step forks the other samples of a prompt. They came back empty, with
    finish_reason None (or were forked later, at the wrong position, and the next step crashed)."""
    out = Engine(varied64, max_batch_tokens=1).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=3),
                                                        n=2)
    assert [(s.token_ids, s.finish_reason) for s in out[0]] == [(out[0][0].token_ids, "length")] * 2


@pytest.mark.parametrize("seed", SAMPLED_SEEDS)
def test_any_schedule_samples_on_policy(varied64, seed, monkeypatch):
    """Temperature 1: every generated token's logprob is the training forward's log-softmax of it."""
    prompts, _, runs, where = run_fuzz_case(varied64, seed, 1.0, monkeypatch)
    for out in runs:
        for prompt, group in zip(prompts, out):
            for s in group:
                logits = training_logits(varied64, prompt, s.token_ids)
                expected = logits.log_softmax(-1).gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
                gen = torch.tensor(s.gen_mask, dtype=torch.bool)
                torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64)[gen], expected[gen],
                                           atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{where}")
