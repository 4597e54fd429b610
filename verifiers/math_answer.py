"""The `math` verifier: is the last \\boxed{...} of the answer numerically equal to the reference?

Answer checking is where math RL quietly goes wrong: a checker that misses "\\dfrac{3}{4}" or
"1,250" punishes right answers, one that takes the *first* box rewards hedging. So: take the last
\\boxed{} of the answer part (braces matched, so \\boxed{\\frac{1}{2}} works), strip the LaTeX a
model wraps numbers in ($, \\left/\\right, \\text{units}, thin spaces, a trailing period), turn
\\frac{a}{b} into a/b, drop thousands separators, parse the result exactly as a fraction and compare
with relative tolerance 1e-6 (exactly, in rationals). Anything that does not parse as a number scores 0.

Module name: `math_answer`, not `math`, so that no path setup can ever make it shadow the stdlib.
"""
import re
from fractions import Fraction

from data.chat import parse_response


def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces matched), or None. One linear pass over the
    braces with a stack, so even a megabyte of unclosed boxes costs milliseconds."""
    openers = {m.end() - 1 for m in re.finditer(r"\\boxed\s*\{", text)}  # positions of their '{'
    stack, best = [], None
    for m in re.finditer(r"[{}]", text) if openers else ():
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            start = stack.pop()
            if start in openers and (best is None or start > best[0]):
                best = (start, m.start())
    return None if best is None else text[best[0] + 1:best[1]]


_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?(?:/[+-]?(?:\d+(?:\.\d*)?|\.\d+))?")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def to_number(text):
    """'\\$1,250.50', '-\\dfrac{3}{4}', '9 \\text{pens}', 'x = 7/2' -> Fraction; None if not a number."""
    s = text.strip()
    if len(s) > 200:  # no sane answer is this long; keeps Fraction away from giant literals
        return None
    s = _TEXT.sub(lambda m: "" if re.search(r"[A-Za-z]", m.group(1)) else m.group(1), s)
    s = _FRAC.sub(r"(\1)/(\2)", s)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "\\$", "$", "\\%", "%", "~", "{", "}"):
        s = s.replace(junk, "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = s.rsplit("=", 1)[-1]  # "x = 9" states the value on the right
    s = re.sub(r"[A-Za-z]+$", "", s)  # a unit word written without \text: "9pens"
    while "(" in s and s != (s := re.sub(r"\(([^()]*)\)", r"\1", s)):
        pass  # parentheses, innermost first: \left(\frac{1}{2}\right) -> ((1)/(2)) -> 1/2
    if _THOUSANDS.fullmatch(s.lstrip("+-")):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    numerator, _, denominator = s.partition("/")
    try:
        return Fraction(numerator) / Fraction(denominator or 1)  # exact, even for "1.5/2"
    except ZeroDivisionError:
        return None


def equal(a, b, rel_tol=Fraction(1, 10**6)):
    """|a - b| <= rel_tol * max(|a|, |b|), in exact arithmetic: no float overflow on 1e999."""
    return abs(a - b) <= rel_tol * max(abs(a), abs(b))


META_KEYS = ("answer",)   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta['answer'] is a number (as a string or a JSON number)."""
    if isinstance(meta["answer"], bool) or to_number(str(meta["answer"])) is None:
        raise ValueError(f"math meta: answer {meta['answer']!r} is not a number")


def score(response, meta):
    """1.0 iff the last \\boxed{} of the answer equals meta['answer'] numerically, else 0.0."""
    reference = to_number(str(meta["answer"]))
    boxed = last_boxed(parse_response(response)["answer"])
    value = None if boxed is None else to_number(boxed)
    return float(value is not None and equal(value, reference))
