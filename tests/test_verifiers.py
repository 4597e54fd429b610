"""Every verifier on right, wrong and malformed responses; the JSON-schema validator on its own; the
tool environment and the chat judge; junk input that must never raise. The sandbox's red-team suite
is tests/test_sandbox.py."""
import json
import random

import pytest

import verifiers
from verifiers import chat, coding, ifeval, longctx, math_answer, mcqa, structured, swe, tool
from verifiers.sandbox import Limits
from verifiers.structured import errors as schema_errors

FAST = Limits(wall_s=5, cpu_s=2, memory_mb=512)


def thinking(answer, reasoning="let me think"):
    """A thinking-mode response as the model generates it (the prompt ended with '<think>\\n')."""
    return f"{reasoning}\n</think>\n{answer}<|im_end|>"


# ---------------------------------------------------------------------------------------------- math

@pytest.mark.parametrize("boxed,answer", [
    ("9", "9"), ("-4", "-4"), ("1,250", "1250"), ("3.50", "3.5"), ("\\frac{3}{4}", "0.75"),
    ("\\dfrac{7}{2}", "7/2"), ("-\\frac{1}{3}", "-1/3"), ("\\left(\\frac{1}{2}\\right)", "1/2"),
    ("9 \\text{ pens}", "9"), ("\\$12", "12"), ("$12.00$", "12"), ("12.", "12"), ("0.3333333", "1/3"),
    ("\\frac{-3}{4}", "-0.75"), ("2.5e3", "2500"), ("x = 9", "9"),
    ("\\frac{1.5}{2}", "3/4"), ("1e2", "100"),
])
def test_math_equivalent_forms(boxed, answer):
    assert math_answer.score(thinking(f"So the result is \\boxed{{{boxed}}}."), {"answer": answer}) == 1.0


@pytest.mark.parametrize("text", [
    "\\boxed{10}", "\\boxed{9.01}", "9", "\\boxed{}", "\\boxed{nine}", "\\boxed{9", "\\boxed{1/0}",
    "\\boxed{9} then \\boxed{10}",  # the last box counts
    "\\boxed{1,25}",  # not a thousands separator
    "\\boxed{1e999}", "\\boxed{-1e999}", "\\boxed{9/0}",
])
def test_math_wrong(text):
    assert math_answer.score(thinking(text), {"answer": "9"}) == 0.0


def test_math_reads_only_the_answer_part():
    assert math_answer.score("\\boxed{9}\n</think>\nthe answer is \\boxed{8}", {"answer": "9"}) == 0.0
    assert math_answer.score("\\boxed{8}\n</think>\nthe answer is \\boxed{9}", {"answer": "9"}) == 1.0


def test_math_nested_braces_and_tolerance():
    assert math_answer.last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert math_answer.score("\\boxed{0.5000001}", {"answer": "1/2"}) == 1.0  # rel. error 2e-7
    assert math_answer.score("\\boxed{0.50001}", {"answer": "1/2"}) == 0.0    # rel. error 2e-5


# ---------------------------------------------------------------------------------------------- mcqa

MCQA = {"answer": "C", "choices": ["a", "b", "c", "d"]}


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{C}", 1.0), ("The answer is \\boxed{\\text{C}}.", 1.0), ("\\boxed{(C)}", 1.0), ("C", 1.0),
    ("so the answer is C.", 1.0), ("(C)", 1.0), ("\\boxed{B}", 0.0), ("\\boxed{A} or \\boxed{C}", 1.0),
    ("\\boxed{C} no wait \\boxed{D}", 0.0), ("\\boxed{E}", 0.0), ("\\boxed{CD}", 0.0), ("I think c", 0.0),
    ("", 0.0), ("Cats are nice", 0.0),
])
def test_mcqa(text, expected):
    assert mcqa.score(thinking(text), MCQA) == expected


# ---------------------------------------------------------------------------------------------- longctx

@pytest.mark.parametrize("text,expected", [
    ("violet-42", 1.0), ("  `Violet-42`.", 1.0), ('"violet-42"', 1.0), ("\\boxed{violet-42}", 1.0),
    ("violet-43", 0.0), ("The value is violet-42", 0.0), ("", 0.0),
])
def test_longctx(text, expected):
    assert longctx.score(thinking(text), {"answer": "violet-42"}) == expected


# ---------------------------------------------------------------------------------------------- structured

SCHEMA = {"type": "object", "required": ["name", "age"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user"]},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
    "score": {"type": ["number", "null"]}}}


@pytest.mark.parametrize("value,valid", [
    ({"name": "Ada", "age": 36}, True),
    ({"name": "Ada", "age": 36.0}, True),                      # integral number is an integer
    ({"name": "Ada", "age": 36.5}, False),
    ({"name": "Ada", "age": True}, False),                     # a boolean is not a number
    ({"name": "Ada", "age": "36"}, False),
    ({"name": "Ada"}, False),                                  # required
    ({"name": "", "age": 1}, False),                           # minLength
    ({"name": "Adalovelace", "age": 1}, False),                # maxLength
    ({"name": "Ada", "age": -1}, False),                       # minimum
    ({"name": "Ada", "age": 151}, False),                      # maximum
    ({"name": "Ada", "age": 1, "x": 1}, False),                # additionalProperties false
    ({"name": "Ada", "age": 1, "role": "admin"}, True),
    ({"name": "Ada", "age": 1, "role": "root"}, False),        # enum
    ({"name": "Ada", "age": 1, "tags": ["a"]}, True),
    ({"name": "Ada", "age": 1, "tags": []}, False),            # minItems
    ({"name": "Ada", "age": 1, "tags": ["a", "b", "c"]}, False),  # maxItems
    ({"name": "Ada", "age": 1, "tags": ["a", 2]}, False),      # items
    ({"name": "Ada", "age": 1, "score": None}, True),          # type list
    ({"name": "Ada", "age": 1, "score": 0.5}, True),
    ({"name": "Ada", "age": 1, "score": False}, False),
    ([{"name": "Ada", "age": 1}], False),                       # not an object
])
def test_schema_validator(value, valid):
    assert (schema_errors(value, SCHEMA) == []) == valid


def test_schema_validator_details():
    assert schema_errors(True, {"enum": [1]}) != [] and schema_errors(1, {"enum": [True]}) != []
    assert schema_errors(1.0, {"enum": [1]}) == [] and schema_errors([1, {"a": 2}], {"enum": [[1, {"a": 2}]]}) == []
    extra_schema = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert schema_errors({"a": 1}, extra_schema) == [] and schema_errors({"a": "x"}, extra_schema) != []
    assert schema_errors({"a": {"b": "x"}}, {"properties": {"a": {"properties": {"b": {"type": "integer"}}}}}) \
        == ["$.a.b: expected integer, found str"]


@pytest.mark.parametrize("text,expected", [
    ('{"name": "Ada", "age": 36}', 1.0),
    ('Here it is:\n```json\n{"name": "Ada", "age": 36}\n```', 1.0),
    ('```\n{"name": "Ada", "age": 36}\n```', 1.0),
    ('{"name": "Ada", "age": 36', 0.0),
    ('{"name": "Ada", "age": NaN}', 0.0),
    ('{"name": "Ada", "age": 1e999}', 0.0),
    ("[" * 100000 + "]" * 100000, 0.0),
    ("", 0.0),
])
def test_structured(text, expected):
    assert structured.score(thinking(text), {"schema": SCHEMA}) == expected


# ---------------------------------------------------------------------------------------------- if

@pytest.mark.parametrize("constraint,good,bad", [
    ({"type": "keywords:existence", "keywords": ["sea", "wave"]}, "The sea has a Wave.", "The sea."),
    ({"type": "keywords:forbidden_words", "forbidden_words": ["blue"]}, "The bluest sea.", "Blue sea."),
    ({"type": "keywords:frequency", "keyword": "sea", "frequency": 2, "relation": "at least"},
     "sea and Sea", "sea only"),
    ({"type": "keywords:frequency", "keyword": "sea", "frequency": 2, "relation": "less than"},
     "sea only", "sea and sea"),
    ({"type": "length_constraints:number_words", "num_words": 3, "relation": "at least"}, "one two three",
     "one two"),
    ({"type": "length_constraints:number_words", "num_words": 3, "relation": "less than"}, "one two",
     "one two three"),
    ({"type": "length_constraints:number_sentences", "num_sentences": 2, "relation": "at least"},
     "One. Two!", "Just one."),
    ({"type": "length_constraints:number_paragraphs", "num_paragraphs": 2}, "One.\n***\nTwo.",
     "One.\n***\n***\nTwo."),
    ({"type": "change_case:english_lowercase"}, "all lower here", "Not lower"),
    ({"type": "change_case:english_capital"}, "ALL CAPS 1", "NOT all"),
    ({"type": "punctuation:no_comma"}, "no commas here", "a, b"),
    ({"type": "detectable_format:number_bullet_lists", "num_bullets": 2}, "Intro\n* one\n- two",
     "* one\n* two\n* three"),
    ({"type": "detectable_format:number_highlighted_sections", "num_highlights": 2}, "*a* and *b*", "*a* only"),
    ({"type": "detectable_format:json_format"}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ({"type": "detectable_format:title"}, "<<The Sea>>\ntext", "The Sea\ntext"),
    ({"type": "startend:start_checker", "start_phrase": "Dear friend"}, "dear friend, hi", "Hi dear friend"),
    ({"type": "startend:end_checker", "end_phrase": "Any questions?"}, "Done. Any questions?", "Any questions? No."),
    ({"type": "startend:quotation"}, '"quoted text"', 'quoted "text"'),
    ({"type": "detectable_content:postscript", "postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. PS bye"),
])
def test_if_checkers(constraint, good, bad):
    meta = {"constraints": [constraint]}
    assert ifeval.score(thinking(good), meta) == 1.0
    assert ifeval.score(thinking(bad), meta) == 0.0


def test_if_prompt_level_strict_and_loose():
    meta = {"constraints": [{"type": "change_case:english_lowercase"}, {"type": "punctuation:no_comma"}]}
    assert ifeval.score(thinking("the sea is calm and wide"), meta) == 1.0
    assert ifeval.score(thinking("the sea, calm and wide"), meta) == 0.0  # one of two fails
    detail = ifeval.score_detail(thinking("Sure! Here it is:\nthe sea is calm"), meta)
    assert detail == {"strict": 0.0, "loose": 1.0, "strict_list": [False, True], "loose_list": [True, True]}
    assert ifeval.score(thinking(""), meta) == 0.0  # silence follows no instruction


def test_if_checker_list_is_complete():
    assert len(ifeval.CHECKERS) >= 15
    for name in ifeval.CHECKERS:  # every id is documented in the contract
        assert name in open("data/DOMAINS.md").read()


# ---------------------------------------------------------------------------------------------- tool

WEATHER_META = {"expected_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}], "answer": "rainy"}


def tool_turns(calls, results, final):
    """A whole multi-turn tool response: calls, the environment's results, the final answer."""
    call_text = "".join(f"<tool_call><function={n}>" + "".join(f"<parameter={k}>{v}</parameter>" for k, v in a.items())
                        + "</function></tool_call>" for n, a in calls)
    responses = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
    return (f"I need the weather\n</think>\n{call_text}<|im_end|>\n<|im_start|>user\n{responses}<|im_end|>\n"
            f"<|im_start|>assistant\n<think>\nok\n</think>\n{final}<|im_end|>")


def test_tool_env():
    env = tool.ToolEnv()
    assert env.run("get_weather", {"city": "Oslo"}) == "rainy"
    assert env.run("get_weather", {"city": " oslo"}) == "rainy"
    assert env.run("get_price", {"item": "coffee"}) == "3.50"
    assert env.run("get_capital", {"country": "Norway"}) == "Oslo"
    assert env.run("convert_units", {"value": 10, "unit": "km"}) == "6.21"
    assert env.run("convert_units", {"value": 2.5, "unit": "kg"}) == "5.51"
    assert env.run("convert_units", {"value": 100, "unit": "c"}) == "212.00"
    assert env.run("nope", {}) == "error: unknown tool 'nope'"
    for name, args in [("get_weather", {"city": 3}), ("get_weather", {}), ("get_weather", {"city": "Oslo", "x": 1}),
                       ("convert_units", {"value": True, "unit": "km"}), ("convert_units", {"value": 1, "unit": "m"}),
                       ("get_weather", {"city": "Atlantis"}), ("get_price", "coffee")]:
        assert env.run(name, args).startswith("error: ")
    declared = {t["function"]["name"] for t in tool.TOOLS}
    assert declared == {"get_weather", "get_price", "get_capital", "convert_units"}
    json.dumps(tool.TOOLS)  # declarations are plain JSON for the system prompt


def test_tool_env_hook_answers_the_latest_turn():
    env = tool.ToolEnv()
    first = "hm\n</think>\n<tool_call><function=get_weather><parameter=city>Oslo</parameter></function></tool_call>"
    assert env.respond(first) == ["rainy"]
    second = first + ("<|im_end|>\n<|im_start|>user\n<tool_response>\nrainy\n</tool_response><|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n\n</think>\n<tool_call><function=get_price><parameter=item>"
                      "tea</parameter></function></tool_call>")
    assert env.respond(second) == ["2.25"]
    assert env.respond(second + "<|im_end|>\n<|im_start|>user\n<tool_response>\n2.25\n</tool_response>") == []


@pytest.mark.parametrize("calls,final,expected", [
    ([("get_weather", {"city": "Oslo"})], "It is rainy in Oslo.", 1.0),
    ([("get_weather", {"city": "Oslo"})], "It is sunny.", 0.5),          # right call, wrong answer
    ([("get_weather", {"city": "Paris"})], "It is Rainy.", 0.0),         # wrong call: the answer earns nothing
    ([("get_weather", {"city": "Oslo"})] * 2, "rainy", 0.0),             # one call too many
    ([("get_wether", {"city": "Oslo"})], "no idea", 0.0),
    ([], "rainy", 0.0),                                                  # no call, right word
])
def test_tool_score(calls, final, expected):
    results = [tool.ToolEnv().run(n, a) for n, a in calls]
    assert tool.score(tool_turns(calls, results, final), WEATHER_META) == expected


def test_tool_numeric_arguments():
    meta = {"expected_calls": [{"name": "convert_units", "arguments": {"value": 10, "unit": "km"}}], "answer": "6.21"}
    calls = [("convert_units", {"value": 10, "unit": "km"})]
    assert tool.score(tool_turns(calls, ["6.21"], "About 6.21 miles."), meta) == 1.0
    calls = [("convert_units", {"value": '"10"', "unit": "km"})]  # a string is not a number
    assert tool.score(tool_turns(calls, ["error"], "About 6.21 miles."), meta) == 0.0


def test_tool_answer_alone_cannot_game_the_reward():
    # every word the tables hold, and no call: the substring test alone would have paid 0.5
    everything = " ".join(list(tool.WEATHER.values()) + list(tool.PRICES.values()) + list(tool.CAPITALS.values()))
    assert tool.score(thinking(everything), WEATHER_META) == 0.0
    calls = [("get_weather", {"city": "Oslo"})]
    assert tool.score(tool_turns(calls, ["rainy"], everything), WEATHER_META) == 1.0  # with the call, it counts


def test_tool_env_never_raises_on_odd_calls(monkeypatch):
    env = tool.ToolEnv()
    assert env.run("convert_units", {"value": 10 ** 400, "unit": "km"}) == "error: value out of range"
    assert env.run("convert_units", {"value": float("nan"), "unit": "km"}) == "error: value out of range"
    call = "<tool_call><function={}><parameter={}>{}</parameter><parameter=unit>km</parameter></function></tool_call>"
    assert env.respond(call.format("convert_units", "value", "9" * 400)) == ["error: value out of range"]
    deep = env.respond(call.format("get_weather", "city", "[" * 5000 + "]" * 5000))  # deeper than the stack
    assert len(deep) == 1 and deep[0].startswith("error: ")
    # and a bug of ours while running a call becomes that call's result, not an exception in the rollout
    monkeypatch.setitem(tool.CONVERSIONS, "km", ("mi", lambda v: v / 0))
    assert env.respond(call.format("convert_units", "value", "1")) == ["error: ZeroDivisionError: float division by zero"]


# ---------------------------------------------------------------------------------------------- chat

CHAT_META = {"topic": "sleep", "keywords": ["sleep", "bed", "routine"], "length": [10, 40]}


def test_chat_judge_each_check():
    good = "You can sleep better with a calm routine. Go to bed at the same time every night."
    assert chat.judge(thinking(good), CHAT_META) == 1.0
    results = chat.checks(thinking("Sleep is good. Sleep is good. Sleep is good. Sleep is good"), CHAT_META)
    assert results == {"keywords": False, "length": True, "no_repetition": False, "punctuation": False,
                       "polite": False}
    assert chat.judge(thinking(good + " I suggest a dark bed room"), CHAT_META) == 0.8  # no final period
    assert chat.judge(thinking("You can sleep in bed."), CHAT_META) == 0.8              # too short
    assert chat.judge(thinking(good.replace("You can", "Just")), CHAT_META) == 0.8      # not polite
    assert chat.judge(thinking(""), CHAT_META) == 0.0


def test_chat_judge_prefers_the_better_answer():
    chosen = "I suggest a fixed bed time. A short evening routine helps you sleep well."
    rejected = "sleep sleep sleep sleep sleep sleep sleep sleep sleep sleep"
    assert chat.judge(thinking(chosen), CHAT_META) > chat.judge(thinking(rejected), CHAT_META)


# ---------------------------------------------------------------------------------------------- code, swe

CODE_META = {"entry_point": "double_all", "tests": [[[[1, 2]], [2, 4]], [[[]], []], [[[-3]], [-6]]]}


@pytest.mark.parametrize("answer,expected", [
    ("```python\ndef double_all(xs):\n    return [2 * x for x in xs]\n```", 1.0),
    ("def double_all(xs):\n    return [x + x for x in xs]", 1.0),                     # no fence
    ("```python\ndef double_all(xs):\n    return tuple(2 * x for x in xs)\n```", 1.0),  # JSON-equal
    ("```python\ndef double_all(xs):\n    return [2 * x for x in xs if x > 0]\n```", 0.0),
    ("```python\ndef double(xs):\n    return [2 * x for x in xs]\n```", 0.0),             # wrong name
    ("```python\ndef double_all(xs)\n    return xs\n```", 0.0),                          # syntax error
    ("```python\ndouble_all = [2, 4]\n```", 0.0),                                       # not a function
    ("```python\ndef double_all(xs):\n    return {2 * x for x in xs}\n```", 0.0),        # a set is not a list
])
def test_code(answer, expected):
    assert coding.score(thinking(answer), CODE_META, FAST) == expected


SWE_META = {
    "files": {"module.py": "def add(a, b):\n    return a - b\n\n\ndef scale(xs, k):\n    return [x * k for x in xs]\n",
              "util.py": "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n"},
    "tests": ("from module import add, scale\nimport util\n\n"
              "def test_add():\n    assert add(1, 2) == 3\n    assert add(-1, 1) == 0\n\n"
              "def test_scale():\n    assert scale([1, 2], 3) == [3, 6]\n\n"
              "def test_util():\n    assert util.clamp(5, 0, 3) == 3\n\n"
              "def test_raises():\n    try:\n        add(1)\n    except TypeError:\n        pass\n    else:\n"
              "        assert False\n"),
}
FIX = "module.py\n<<<<<<< SEARCH\n    return a - b\n=======\n    return a + b\n>>>>>>> REPLACE"


@pytest.mark.parametrize("answer,expected", [
    (FIX, 1.0),
    (f"The bug is the sign.\n```\n{FIX}\n```", 1.0),
    (FIX.replace("a + b", "b + a"), 1.0),
    (FIX.replace("a + b", "a * b"), 0.0),                                  # wrong fix
    ("", 0.0),                                                            # no patch
    (FIX.replace("module.py", "nothere.py"), 0.0),                        # unknown file
    (FIX.replace("return a - b", "return a - c"), 0.0),                   # SEARCH not found
    (FIX.replace(">>>>>>> REPLACE", ""), 0.0),                            # malformed
    ("module.py\n<<<<<<< SEARCH\n    return\n=======\n    return 3\n>>>>>>> REPLACE", 0.0),  # SEARCH twice
])
def test_swe(answer, expected):
    assert swe.score(thinking(answer), SWE_META, FAST) == expected


def test_swe_objects_through_handles():
    meta = {"files": {"stack.py": "class Stack:\n    def __init__(self):\n        self.items = []\n"
                                  "    def push(self, x):\n        self.items.append(x)\n"
                                  "    def pop(self):\n        return self.items.pop(0)\n"
                                  "    def __len__(self):\n        return len(self.items)\n"},
            "tests": "from stack import Stack\n\ndef test_lifo():\n    s = Stack()\n    s.push(1)\n    s.push(2)\n"
                     "    assert len(s) == 2\n    assert s.pop() == 2\n    assert s.items == [1]\n"}
    fix = "stack.py\n<<<<<<< SEARCH\n        return self.items.pop(0)\n=======\n        return self.items.pop()\n>>>>>>> REPLACE"
    assert swe.score(thinking(fix), meta, FAST) == 1.0
    assert swe.score(thinking(fix.replace("pop()", "pop(0)")), meta, FAST) == 0.0


def test_swe_patch_refusals():
    files = {"module.py": "x = 1\n", "tests/test_module.py": "def test_x():\n    pass\n"}
    block = "{}\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE"
    assert swe.apply_patch(files, block.format("module.py"))["module.py"] == "x = 2\n"
    for path in ["tests/test_module.py", "/abs/module.py", "../module.py", "./module.py", "sub/../module.py"]:
        with pytest.raises(swe.PatchError):
            swe.apply_patch(files | {"tests/test_module.py": "x = 1\n"}, block.format(path))


# ---------------------------------------------------------------------------------------------- dispatch, junk

METAS = {"math": {"answer": "9"}, "code": CODE_META, "if": {"constraints": [{"type": "punctuation:no_comma"}]},
         "mcqa": MCQA, "structured": {"schema": SCHEMA}, "tool": WEATHER_META, "longctx": {"answer": "violet-42"},
         "chat": CHAT_META, "swe": SWE_META}


def test_dispatch_and_errors():
    assert set(METAS) == set(verifiers.VERIFIERS)
    assert verifiers.score("math", thinking("\\boxed{9}"), {"answer": "9"}) == 1.0
    with pytest.raises(ValueError, match="unknown domain"):
        verifiers.score("poetry", "x", {})
    with pytest.raises(ValueError, match="math meta"):
        verifiers.score("math", "\\boxed{9}", {"solution": "9"})
    with pytest.raises(ValueError, match="meta must be a dict"):
        verifiers.score("mcqa", "C", None)
    for domain, meta in METAS.items():
        verifiers.check_meta(domain, meta)  # the good metas of these tests pass


BAD_METAS = [  # (domain, meta, what the error must say): each would otherwise score 0, or anything, silently
    ("math", {"answer": "many"}, "not a number"),
    ("code", CODE_META | {"entry_point": "double all"}, "function name"),
    ("code", CODE_META | {"tests": [[1, 2]]}, "[args, expected]"),
    ("if", {"constraints": []}, "non-empty list"),
    ("if", {"constraints": [{"type": "nope"}]}, "unknown constraint"),
    ("if", {"constraints": [{"type": "length_constraints:number_words", "num_words": 3, "relation": "at most"}]},
     "bad relation 'at most' (one of ['at least', 'less than'])"),
    ("if", {"constraints": [{"type": "keywords:existence", "keyword": ["sea"]}]}, "takes ['keywords']"),
    ("if", {"constraints": [{"type": "startend:end_checker", "end_phrase": " "}]}, "bad end_phrase"),
    ("mcqa", MCQA | {"answer": ""}, "is not one of"),
    ("mcqa", MCQA | {"answer": "AB"}, "is not one of"),
    ("mcqa", MCQA | {"answer": "E"}, "is not one of"),
    ("mcqa", MCQA | {"choices": []}, "1 to 26"),
    ("structured", {"schema": {"type": "string", "pattern": "x"}}, "outside the supported subset: ['pattern']"),
    ("structured", {"schema": {"properties": {"age": {"type": "text"}}}}, "schema at $.properties.age: type"),
    ("structured", {"schema": {"items": {"minimum": "0"}}}, "$.items: minimum must be a number"),
    ("structured", {"schema": {"type": "object", "additionalProperties": "no"}}, "must be an object"),
    ("tool", WEATHER_META | {"answer": ""}, "non-empty string"),
    ("tool", WEATHER_META | {"expected_calls": [{"name": "get_weather", "arguments": {"town": "Oslo"}}]},
     "missing argument 'city'"),
    ("longctx", {"answer": " `` "}, "non-empty string"),
    ("chat", CHAT_META | {"keywords": ["sleep"]}, "at least two"),
    ("chat", CHAT_META | {"length": [40, 10]}, "low <= high"),
    ("swe", SWE_META | {"tests": "def test_x(:\n"}, "do not compile"),
    ("swe", SWE_META | {"tests": "x = 1\n"}, "no test_ function"),
    ("swe", SWE_META | {"files": {"/etc/module.py": "x = 1\n"}}, "relative"),
]


@pytest.mark.parametrize("domain,meta,reason", BAD_METAS)
def test_bad_meta_raises_instead_of_scoring(domain, meta, reason):
    with pytest.raises(ValueError, match=f"^{domain} meta") as e:
        verifiers.check_meta(domain, meta)
    assert reason in str(e.value)
    with pytest.raises(ValueError):  # score checks first: a bad meta is never a silent 0
        verifiers.score(domain, thinking('{"name": "Ada", "age": 36}'), meta)


def test_domains_md_meta_examples_are_valid_metas():
    """The `meta` column of DOMAINS.md's table, with its "…" elisions dropped, is what the verifiers read."""
    rows = [line.split(" | ") for line in open("data/DOMAINS.md") if line.startswith("| `")]
    examples = {row[0].strip("|` "): row[2].split("`")[1] for row in rows if len(row) == 4}  # not the tools table
    assert set(examples) == set(verifiers.VERIFIERS)
    for domain, text in examples.items():
        meta = json.loads(text.replace(", …]", "]").replace("{…}", "{}"))
        if domain == "swe":  # its example elides the sources, so it names the keys only
            assert set(meta) == set(verifiers.swe.META_KEYS)
        else:
            verifiers.check_meta(domain, meta)


def junk_responses(seed=0):
    rng = random.Random(seed)
    pieces = ["\\boxed{", "}", "</think>", "<tool_call>", "<function=get_weather>", "<parameter=city>",
              "</parameter>", "</function>", "</tool_call>", "<tool_response>", "</tool_response>", "```",
              "```python\n", "<<<<<<< SEARCH\n", "=======\n", ">>>>>>> REPLACE\n", "module.py\n", "{", "[",
              "\"", "\\frac{", "***", "<<", ">>", "\n", "*", "\x00", "\ud800", "😀", "e999", "1/0"]
    yield from ["", " ", "\n" * 10000, "\x00\xff\xfe", "\ud800\udfff", "</think>", "\\boxed{" * 5000,
                "<<" * 20000 + "x", "[" * 100000, "a" * 1_000_000, "`" * 1_000_000, bytes(range(256)).decode("latin-1")]
    for _ in range(40):
        yield "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))


@pytest.mark.parametrize("domain", [d for d in METAS if d not in ("code", "swe")])
def test_never_raises_on_junk(domain):
    module = verifiers.VERIFIERS[domain]
    for response in junk_responses():
        value = module.score(response, METAS[domain])  # the module itself, not the guarded dispatch
        assert 0.0 <= value <= 1.0


def test_sandboxed_never_raise_on_junk():
    junk = [r for r in junk_responses(1)][::6] + ["```python\n\x00\n```", "```python\n\ud800\n```"]
    domains = ["code"] * len(junk) + ["swe"] * len(junk)
    metas = [CODE_META] * len(junk) + [SWE_META] * len(junk)
    assert verifiers.score_many(domains, junk + junk, metas) == [0.0] * len(domains)


def test_score_many_matches_score():
    domains = ["math", "code", "swe", "mcqa", "code"]
    responses = [thinking("\\boxed{9}"), thinking("def double_all(xs):\n    return [2*x for x in xs]"),
                 thinking(FIX), thinking("\\boxed{A}"), thinking("def double_all(xs):\n    return xs")]
    metas = [METAS[d] for d in domains]
    assert verifiers.score_many(domains, responses, metas, workers=2) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_reference_answers_of_the_data_generators_score_one():
    """The contract from the other side: what data/domains.py writes as the SFT answer for an item
    must earn full reward from the verifier of its domain (4 items per domain and difficulty)."""
    domains_mod = pytest.importorskip("data.domains")
    from data.chat import render
    batch = []
    for domain in verifiers.VERIFIERS:
        for difficulty in (0.0, 1.0):
            for it in domains_mod.generate(domain, "sft", 4, seed=3, difficulty=difficulty):
                rec = domains_mod.sft_record(domain, it, thinking=True)
                pieces = render(rec["messages"], rec.get("tools"))
                prompt = "".join(p for p, _ in render(rec["messages"][:1], rec.get("tools")))
                generated = "".join(p for p, _ in pieces)[len(prompt):]
                batch.append((domain, generated.split("<|im_start|>assistant\n<think>\n", 1)[1], it["meta"]))
    domains, responses, metas = zip(*batch)
    assert verifiers.score_many(list(domains), list(responses), list(metas)) == [1.0] * len(batch)
