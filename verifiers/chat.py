"""The `chat` domain's hidden judge: a rule-based stand-in for human preference.

In the paper, RLHF optimizes a large generative reward model trained on human preferences, and
ArenaHard measures win rates judged by a strong LLM. At tiny scale we need a "human" whose taste is
consistent and checkable, so this judge plays that part. It is *hidden*: RL never calls it. The
data generator uses it to build preference pairs (`chosen` judged strictly higher than `rejected`),
rlhf.py trains a Bradley-Terry reward model on those pairs and optimizes that; the cascade then
reports the judge's win rate against the SFT checkpoint. Whether the learned reward model transfers
the judge's taste is exactly what RLHF is about.

The score is the mean of five checks on the answer (DOMAINS.md): it mentions at least two of the
topic's keywords; its word count is within `length`; nothing repeats (no sentence, no 3-word
phrase: small models love to loop); it ends with terminal punctuation; it addresses the reader
politely with one of POLITE_PHRASES.
"""
import re

from data.chat import parse_response

POLITE_PHRASES = ("you can", "you could", "you might", "i suggest", "i recommend", "try to", "consider")

_WORD = re.compile(r"[a-z0-9']+")


def _words(text):
    return _WORD.findall(text.lower())


META_KEYS = ("topic", "keywords", "length")   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta has a topic, two or more keywords and a [low, high] word range."""
    if not isinstance(meta["topic"], str):
        raise ValueError(f"chat meta: topic must be a string, got {meta['topic']!r}")
    keywords = meta["keywords"]
    if not (isinstance(keywords, list) and len(keywords) >= 2
            and all(isinstance(k, str) and k.strip() for k in keywords)):  # the check asks for two mentions
        raise ValueError(f"chat meta: keywords must be a list of at least two words, got {keywords!r}")
    length = meta["length"]
    if not (isinstance(length, list) and len(length) == 2 and all(type(n) is int for n in length)
            and 0 <= length[0] <= length[1]):
        raise ValueError(f"chat meta: length must be [low, high] word counts, 0 <= low <= high, got {length!r}")


def checks(response, meta):
    """The five judge checks on the answer part of `response`, as a dict of booleans."""
    answer = parse_response(response)["answer"]
    low, high = meta["length"]
    words = _words(answer)
    sentences = [" ".join(_words(s)) for s in re.split(r"[.!?]+", answer)]
    sentences = [s for s in sentences if s]
    trigrams = list(zip(words, words[1:], words[2:]))
    return {
        "keywords": sum(bool(re.search(r"\b" + re.escape(k.lower()), answer.lower()))
                        for k in meta["keywords"]) >= 2,
        "length": low <= len(words) <= high,
        # an empty answer does not get the no-repetition point for free
        "no_repetition": bool(words) and len(set(sentences)) == len(sentences)
                         and len(set(trigrams)) == len(trigrams),
        "punctuation": answer.rstrip().endswith((".", "!", "?")),
        "polite": any(re.search(r"\b" + p + r"\b", answer.lower()) for p in POLITE_PHRASES),
    }


def judge(response, meta):
    """The hidden judge's score in [0, 1]: the fraction of the five checks that hold."""
    results = checks(response, meta)
    return sum(results.values()) / len(results)


def wins(mine, reference):
    """Per prompt, the judge's verdict on answer `mine` against the reference answer, from their
    judge scores: 1 for a win, 1/2 for a tie, 0 for a loss (a win rate is their mean)."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, reference)]


score = judge
