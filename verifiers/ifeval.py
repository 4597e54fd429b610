"""The `if` (instruction following) verifier: IFEval-style rule checkers.

Each constraint in `meta["constraints"]` is an IFEval instruction id plus IFEval's keyword arguments
("keywords:frequency" with keyword, frequency, relation). `CHECKERS` maps each id to a function
`(answer, **kwargs) -> bool`; they follow IFEval's definitions, simplified where IFEval leans on
nltk or langdetect (words are `\\w+` runs, sentences end at . ! ?).

Scores, as in IFEval:
- strict prompt-level (`score`, the RL reward): 1 iff every constraint holds on the answer;
- loose (`score_detail`): a constraint also counts as held if it holds on the answer with its first
  and/or last line removed, each also with `*` removed, which forgives a stray "Sure, here it is:"
  header or a markdown artefact.
An empty answer follows no instruction: otherwise "be lowercase, use no commas" would reward silence.
Module name `ifeval` because `if` is a Python keyword.
"""
import inspect
import json
import re

from data.chat import parse_response


RELATIONS = ("at least", "less than")


def _compare(count, n, relation):
    return count >= n if relation == "at least" else count < n


def _words(text):
    return re.findall(r"\w+", text)


def _sentences(text):
    return [s for s in re.split(r"[.!?]+(?:\s+|$)", text) if s.strip()]


def _json_format(text):
    text = text.strip().removeprefix("```json").removeprefix("```JSON").removeprefix("```")
    try:
        json.loads(text.removesuffix("```").strip())
        return True
    except (ValueError, RecursionError):
        return False


def _paragraphs(text, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    if any(not p.strip() for p in paragraphs[1:-1]):  # an empty paragraph in the middle
        return False
    return len([p for p in paragraphs if p.strip()]) == num_paragraphs


def _highlights(text):
    spans = re.findall(r"\*[^\n*]*\*", text) + re.findall(r"\*\*[^\n*]*\*\*", text)
    return sum(1 for s in spans if s.strip("*").strip())


CHECKERS = {
    "keywords:existence": lambda a, keywords: all(re.search(re.escape(k), a, re.I) for k in keywords),
    "keywords:forbidden_words": lambda a, forbidden_words: not any(
        re.search(r"\b" + re.escape(w) + r"\b", a, re.I) for w in forbidden_words),
    "keywords:frequency": lambda a, keyword, frequency, relation: _compare(
        len(re.findall(re.escape(keyword), a, re.I)), frequency, relation),
    "length_constraints:number_words": lambda a, num_words, relation: _compare(
        len(_words(a)), num_words, relation),
    "length_constraints:number_sentences": lambda a, num_sentences, relation: _compare(
        len(_sentences(a)), num_sentences, relation),
    "length_constraints:number_paragraphs": lambda a, num_paragraphs: _paragraphs(a, num_paragraphs),
    "change_case:english_lowercase": lambda a: a == a.lower(),
    "change_case:english_capital": lambda a: a == a.upper(),
    "punctuation:no_comma": lambda a: "," not in a,
    "detectable_format:number_bullet_lists": lambda a, num_bullets: len(
        re.findall(r"^[ \t]*[*-] ", a, re.M)) == num_bullets,
    "detectable_format:number_highlighted_sections": lambda a, num_highlights: _highlights(a) >= num_highlights,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": lambda a: any(t.strip() for t in re.findall(r"<<([^\n<>]*)>>", a)),
    "startend:start_checker": lambda a, start_phrase: a.strip().lower().startswith(start_phrase.strip().lower()),
    "startend:end_checker": lambda a, end_phrase: a.strip().lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda a: len(a.strip()) > 1 and a.strip()[0] == a.strip()[-1] == '"',
    "detectable_content:postscript": lambda a, postscript_marker: bool(
        re.search(r"^[ \t]*" + re.escape(postscript_marker.strip()), a, re.I | re.M)),
}


def _kwarg_ok(name, value):
    """Is `value` a sensible IFEval kwarg `name`? (An empty phrase would hold for every answer.)"""
    if name == "relation":
        return value in RELATIONS
    if name in ("keywords", "forbidden_words"):
        return isinstance(value, list) and bool(value) and all(isinstance(w, str) and w.strip() for w in value)
    if name == "frequency" or name.startswith("num_"):
        return type(value) is int and value >= 0
    return isinstance(value, str) and bool(value.strip())  # keyword, start_phrase, ...


META_KEYS = ("constraints",)   # what score reads from meta; verifiers.check_meta checks they are there


# each checker's kwarg names, read from its signature once
KWARGS = {name: list(inspect.signature(f).parameters)[1:] for name, f in CHECKERS.items()}


def check_meta(meta):
    """Raise ValueError unless meta['constraints'] is a non-empty list of known instruction ids, each
    with exactly the kwargs its checker takes, each kwarg of the right kind."""
    constraints = meta["constraints"]
    if not (isinstance(constraints, list) and constraints):  # no constraint would reward any answer
        raise ValueError("if meta: constraints must be a non-empty list")
    for i, c in enumerate(constraints):
        checker = CHECKERS.get(c["type"]) if isinstance(c, dict) and isinstance(c.get("type"), str) else None
        if checker is None:
            raise ValueError(f"if meta: constraints[{i}]: unknown constraint type in {c!r}")
        wanted = KWARGS[c["type"]]
        given = [k for k in c if k != "type"]
        if sorted(given) != sorted(wanted):
            raise ValueError(f"if meta: constraints[{i}] ({c['type']}) takes {wanted}, got {given}")
        for k in given:
            if not _kwarg_ok(k, c[k]):
                hint = f" (one of {list(RELATIONS)})" if k == "relation" else ""
                raise ValueError(f"if meta: constraints[{i}] ({c['type']}): bad {k} {c[k]!r}{hint}")


def _check(constraint, text):
    kwargs = {k: v for k, v in constraint.items() if k != "type"}
    return bool(text.strip()) and CHECKERS[constraint["type"]](text, **kwargs)


def _loose_variants(answer):
    lines = answer.split("\n")
    variants = [answer, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    return variants + [v.replace("*", "") for v in variants]


def score_detail(response, meta):
    """dict(strict, loose, strict_list, loose_list): prompt-level scores and per-constraint results."""
    answer = parse_response(response)["answer"]
    constraints = meta["constraints"]
    strict_list = [_check(c, answer) for c in constraints]
    variants = _loose_variants(answer)
    loose_list = [any(_check(c, v) for v in variants) for c in constraints]
    return {"strict": float(all(strict_list)), "loose": float(all(loose_list)),
            "strict_list": strict_list, "loose_list": loose_list}


def score(response, meta):
    """Strict prompt-level: 1.0 iff every constraint holds on the answer."""
    return score_detail(response, meta)["strict"]
