"""The `code` verifier: does the model's function pass the hidden tests?

The code is the last ```python (or ```py) fence of the answer, else the whole answer. It is run in
the sandbox (sandbox.run_function_tests): the function lives in a box, the expected values stay in
this process, so the reward is 1 only if every `entry_point(*args)` really returns `expected`
(compared as JSON data: a tuple matches a list, as it would after a JSON round trip). Binary
reward, as in the paper's code RL.

Module name `coding`, not `code`, so that it can never shadow the stdlib module `code`.
"""
import re

from data.chat import parse_response
from verifiers.sandbox import Limits, run_function_tests

_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.S)


def extract_code(answer):
    fences = _FENCE.findall(answer)
    return fences[-1] if fences else answer


META_KEYS = ("entry_point", "tests")   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta names a function and holds a non-empty list of [args, expected] tests."""
    if not (isinstance(meta["entry_point"], str) and meta["entry_point"].isidentifier()):
        raise ValueError(f"code meta: entry_point must be a function name, got {meta['entry_point']!r}")
    tests = meta["tests"]
    if not (isinstance(tests, list) and tests
            and all(isinstance(t, list) and len(t) == 2 and isinstance(t[0], list) for t in tests)):
        raise ValueError("code meta: tests must be a non-empty list of [args, expected] pairs")


def score(response, meta, limits=Limits()):
    """1.0 iff the code defines meta['entry_point'] and passes every [args, expected] of meta['tests']."""
    source = extract_code(parse_response(response)["answer"])
    return float(run_function_tests(source, meta["entry_point"], meta["tests"], limits) == len(meta["tests"]))
