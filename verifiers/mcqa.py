"""The `mcqa` verifier: did the model pick the right letter?

The letter is the content of the last \\boxed{} in the answer ("\\boxed{C}", "\\boxed{\\text{C}}",
"\\boxed{(C)}"); without a box, a lone letter at the very end of the answer ("... so the answer is
C." or just "C") counts too, because the prompt asks for the box but a short answer is unambiguous.
Only letters that name one of `meta["choices"]` are accepted.
"""
import re

from data.chat import parse_response
from verifiers.math_answer import last_boxed

_BOXED_LETTER = re.compile(r"\s*(?:\\text\s*\{\s*)?\(?\s*([A-Za-z])\s*\)?\s*\}?\s*")
_FINAL_LETTER = re.compile(r"(?:^|[\s(])\(?([A-Z])\)?[.:!]?\s*$")


def chosen_letter(answer):
    """The letter the answer commits to (uppercase), or None."""
    boxed = last_boxed(answer)
    if boxed is not None:
        m = _BOXED_LETTER.fullmatch(boxed)
        return m.group(1).upper() if m else None
    m = _FINAL_LETTER.search(answer[-20:])
    return m.group(1) if m else None


META_KEYS = ("answer", "choices")   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta has 1 to 26 choices and an answer that is exactly one of their letters."""
    choices = meta["choices"]
    if not (isinstance(choices, list) and 1 <= len(choices) <= 26):
        raise ValueError(f"mcqa meta: choices must be a list of 1 to 26 options, got {str(choices)[:80]}")
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(choices)])
    if meta["answer"] not in letters:  # a list, not a string: "" and "AB" are not letters of "ABCD"
        raise ValueError(f"mcqa meta: answer {meta['answer']!r} is not one of {letters}")


def score(response, meta):
    """1.0 iff the chosen letter is meta['answer'] (a letter of one of meta['choices'])."""
    return float(chosen_letter(parse_response(response)["answer"]) == meta["answer"])
