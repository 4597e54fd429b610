"""Do the generated code and swe tests separate right answers from plausible wrong ones?

A weak hidden test is a reward for wrong code, and RL finds it: "removes every element equal to 4"
tested on lists without a 4 pays `return xs`; a swe bug tested only on the call the prompt names
pays a patch that special-cases that call. Over a few hundred generated tasks per difficulty, this
tries a family of trivial wrong programs (identity, len, sum, sorted, constants, every single map or
filter step with every constant near the prompt's, with each reduction) and of dishonest patches
(special-case the named call, return its expected value, a different wrong edit of the buggy line,
no change), and counts the tasks on which one of them earns reward. It must be under 0.5%.

The tests run in this process, for speed (~300k calls), with the verifiers' own definitions: a
code answer passes iff `sandbox.to_json_data(box.encode(f(*args))) == expected` for every test of
meta["tests"], as run_function_tests decides; a swe patch is applied by swe.apply_patch and
meta["tests"] runs against the patched module. A sample is checked against the real sandbox.
"""
import ast
import random
import re
import sys
import types

import pytest

import verifiers
from data.domains import CODE_ENDS, CODE_FILTERS, CODE_MAPS, SWE_FUNCS, generate
from verifiers import box, sandbox, swe

TASKS = 300
MAX_RATE = 0.005


# ------------------------------------------------------------------------------------------- code

def code_passes(fn, tests):
    """run_function_tests' verdict, computed here: every result, as the judge decodes it, equals."""
    try:
        return all(sandbox.to_json_data(box.encode(fn(*args))) == expected for args, expected in tests)
    except Exception:  # raised, or returned what is not data: the box would report a failure
        return False


def trivial_code_programs(tests):
    yield "identity", lambda xs: xs
    yield "len", len
    yield "sum", sum
    yield "sorted", sorted
    yield "reversed", lambda xs: xs[::-1]
    for value in {repr(t[1]): t[1] for t in tests}.values():  # every expected value, as a constant
        yield f"constant {value!r}", lambda xs, v=value: v
    for template in CODE_MAPS + CODE_FILTERS:
        for k in range(-1, 11):
            for end in CODE_ENDS:
                yield f"{template[1].format(k=k)}; {end[1]}", one_step(template, k, end)


def one_step(template, k, end):
    """One map or filter step of the domain's family, then a reduction (xs, sum or len)."""
    fn = template[3]
    if template in CODE_MAPS:
        return lambda xs: end[3]([fn(x, k) for x in xs])
    return lambda xs: end[3]([x for x in xs if fn(x, k)])


def reference_function(it):
    source = re.search(r"```python\n(.*?)```", it["turns"][-1]["content"], re.S).group(1)
    scope = {}
    exec(source, scope)  # our own generated reference
    return scope[it["meta"]["entry_point"]]


def is_wrong(fn, reference, rng, hard):
    """Differs from the reference on some of 400 fresh inputs of the task's range (or raises)."""
    lo, hi = (-9, 20) if hard else (0, 9)
    for xs in [[]] + [[rng.randint(lo, hi) for _ in range(rng.randint(1, 8))] for _ in range(400)]:
        try:
            if fn(list(xs)) != reference(list(xs)):
                return True
        except Exception:
            return True
    return False


def code_rate(difficulty):
    rng = random.Random(difficulty)
    fooled = []
    for it in generate("code", "rl", TASKS, seed=21, difficulty=difficulty):
        tests, reference = it["meta"]["tests"], reference_function(it)
        for name, fn in trivial_code_programs(tests):
            if code_passes(fn, tests) and is_wrong(fn, reference, rng, difficulty > 0):
                fooled.append((it["prompt"], name))
                break
    return fooled


# -------------------------------------------------------------------------------------------- swe

BUG = re.compile(r"Bug: `(\w+)\((.*)\)` returns (.*) but should return (.*)\.\n")


def swe_passes(files, test_source):
    """run_module_tests' verdict, computed here: every test_* of the source passes against the
    patched module (plain values: the generated tests compare only those)."""
    module = types.ModuleType("module")
    saved = sys.modules.get("module")
    try:
        exec(files["module.py"], module.__dict__)
        sys.modules["module"] = module
        namespace = {"__name__": "tests"}
        exec(test_source, namespace)
        for name, fn in list(namespace.items()):
            if name.startswith("test_") and isinstance(fn, types.FunctionType):
                fn()
        return True
    except Exception:
        return False
    finally:
        if saved is None:
            sys.modules.pop("module", None)
        else:
            sys.modules["module"] = saved


def dishonest_patches(it):
    """(name, patch text): patches a model could write without fixing the bug."""
    name, args, _, expected = BUG.search(it["prompt"]).groups()
    failing = ast.literal_eval(f"({args},)")
    module = it["meta"]["files"]["module.py"]
    header = next(line for line in module.split("\n") if line.startswith(f"def {name}("))
    params = header[len(f"def {name}("):-2]
    bad_line, good_line = it["turns"][-1]["content"].split("\n")[2], it["turns"][-1]["content"].split("\n")[4]
    patch = "module.py\n<<<<<<< SEARCH\n{}\n=======\n{}\n>>>>>>> REPLACE"
    yield "special-cases the named call", patch.format(
        header, f"{header}\n    if ({params},) == {failing!r}:\n        return {expected}")
    yield "returns the named call's answer", patch.format(bad_line, f"{bad_line[:4]}return {expected}")
    yield "changes nothing", patch.format(bad_line, bad_line)
    template = next(t for t in SWE_FUNCS if name in t[0])
    edits = {good_line.replace(g.format(k=k, k1=k + 1), b.format(k=k, k1=k + 1), 1)
             for g, b in template[3] for k in range(1, 50) if g.format(k=k, k1=k + 1) in good_line}
    for line in sorted(edits - {bad_line, good_line}):  # another wrong edit: the template's other bugs
        yield f"edits the line to {line.strip()}", patch.format(bad_line, line)


def swe_is_wrong(patched, it, rng):
    """The patched buggy function differs from the fixed one on some of 400 random arguments."""
    name = BUG.search(it["prompt"]).group(1)
    fixed = swe.apply_patch(it["meta"]["files"], it["turns"][-1]["content"])
    mine, theirs = {}, {}
    exec(patched["module.py"], mine)
    exec(fixed["module.py"], theirs)
    code = theirs[name].__code__
    for _ in range(400):
        args = ([rng.randint(0, 60) for _ in range(rng.randint(0, 6))],) if code.co_varnames[0] == "xs" else \
            tuple(rng.randint(-10, 60) for _ in range(code.co_argcount))
        try:
            want = theirs[name](*args)
        except Exception:
            continue  # outside the function's domain (the last of an empty list)
        try:
            if mine[name](*args) != want:
                return True
        except Exception:
            return True
    return False


def swe_rate(difficulty):
    rng = random.Random(difficulty)
    fooled = []
    for it in generate("swe", "rl", TASKS, seed=21, difficulty=difficulty):
        for name, patch in dishonest_patches(it):
            patched = swe.apply_patch(it["meta"]["files"], patch)
            if swe_passes(patched, it["meta"]["tests"]) and swe_is_wrong(patched, it, rng):
                fooled.append((it["prompt"], name))
                break
    return fooled


# ------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("domain", ["code", "swe"])
@pytest.mark.parametrize("difficulty", [0.0, 1.0])
def test_trivial_wrong_answers_earn_no_reward(domain, difficulty, capsys):
    fooled = (code_rate if domain == "code" else swe_rate)(difficulty)
    rate = len(fooled) / TASKS
    with capsys.disabled():  # the rate is a report, shown on every run
        print(f"\n{domain} difficulty {difficulty}: a trivial wrong answer earns reward on {len(fooled)} of "
              f"{TASKS} tasks ({100 * rate:.2f}%)")
    assert rate < MAX_RATE, fooled[:3]


def test_in_process_verdicts_match_the_sandbox():
    """The shortcut above is only worth its speed if it agrees with the verifiers: a sample of
    right, trivial and dishonest answers, scored both ways."""
    domains, responses, metas, expected = [], [], [], []
    for it in generate("code", "rl", 6, seed=5, difficulty=0.5):
        name = it["meta"]["entry_point"]
        reference = re.search(r"```python\n(.*?)```", it["turns"][-1]["content"], re.S).group(1)
        for source in [reference] + [f"def {name}(xs):\n    return {body}\n" for body in ("xs", "len(xs)", "sum(xs)")]:
            scope = {}
            exec(source, scope)
            domains.append("code")
            responses.append(f"</think>\n```python\n{source}```")
            metas.append(it["meta"])
            expected.append(float(code_passes(scope[name], it["meta"]["tests"])))
    for it in generate("swe", "rl", 6, seed=5, difficulty=0.5):
        for _, patch in [("reference", it["turns"][-1]["content"])] + list(dishonest_patches(it))[:3]:
            domains.append("swe")
            responses.append(f"</think>\n{patch}")
            metas.append(it["meta"])
            expected.append(float(swe_passes(swe.apply_patch(it["meta"]["files"], patch), it["meta"]["tests"])))
    assert verifiers.score_many(domains, responses, metas) == expected
    assert 0 < sum(expected) < len(expected)  # both verdicts occur in the sample
