"""The `longctx` verifier: exact match of the retrieved value, after a light normalization.

The prompt asks for "the value only"; we forgive the wrapping a model adds around a correct value —
surrounding whitespace, quotes or backticks, a final period, a \\boxed{}, letter case — and nothing
else: "violet-42" matches "`Violet-42`." but not "violet-43" or "the value is violet-42".
"""
from data.chat import parse_response
from verifiers.math_answer import last_boxed


def normalize(text):
    text = text.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed.strip()
    text = text.removesuffix(".").strip()
    for _ in range(3):  # a few layers of quoting at most: "`x`" (a loop over a huge answer would be slow)
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
            text = text[1:-1].strip()
    return text.removesuffix(".").strip().lower()


META_KEYS = ("answer",)   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta['answer'] is a string that is not empty once normalized."""
    if not (isinstance(meta["answer"], str) and normalize(meta["answer"])):  # "" would reward silence
        raise ValueError(f"longctx meta: answer must be a non-empty string, got {meta['answer']!r}")


def score(response, meta):
    """1.0 iff the normalized answer equals the normalized meta['answer']."""
    return float(normalize(parse_response(response)["answer"]) == normalize(meta["answer"]))
