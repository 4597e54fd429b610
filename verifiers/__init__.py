"""Verifiers: one pure `score(response, meta) -> float in [0, 1]` per built-in domain (DOMAINS.md).

    domain      module                    checks
    math        verifiers.math_answer     last \\boxed{} equals the answer numerically
    code        verifiers.coding          the function passes hidden tests in the sandbox
    if          verifiers.ifeval          IFEval constraints, strict prompt-level (+ loose detail)
    mcqa        verifiers.mcqa            the chosen letter
    structured  verifiers.structured      the JSON validates against a JSON-schema subset
    tool        verifiers.tool            the right tool calls + the answer read back
    longctx     verifiers.longctx         exact match after normalization
    chat        verifiers.chat            the hidden rule-based judge
    swe         verifiers.swe             the patch applies and the tests pass in the sandbox

(`math_answer`, `coding` and `ifeval` avoid the names of the stdlib's `math` and `code` and the
keyword `if`.) The sandbox for `code` and `swe` is verifiers/sandbox.py + verifiers/box.py.

The contract: a verifier never raises on model output — any string, empty, huge, binary junk.
The checkers are written to hold that (bounded regexes, parse errors caught where parsing happens);
`score` below adds one more guard at the boundary, since an exception in an RL step would kill a run
over one odd sample. A bad `meta` is our data's fault, and it must not hide behind that guard as a
reward of 0: each module's `check_meta(meta)` raises a ValueError that says what is wrong, and
`check_meta(domain, meta)` below is the one place it is called from, by `score` before scoring and
by data.load_jsonl on every RL line (so a user's file fails at path:line, not mid-run).
"""
import os
from concurrent.futures import ThreadPoolExecutor

from verifiers import chat, coding, ifeval, longctx, math_answer, mcqa, structured, swe, tool
from verifiers.sandbox import SandboxError

VERIFIERS = {"math": math_answer, "code": coding, "if": ifeval, "mcqa": mcqa, "structured": structured,
             "tool": tool, "longctx": longctx, "chat": chat, "swe": swe}
SANDBOXED = ("code", "swe")


def check_meta(domain, meta):
    """Raise ValueError if `meta` is not what the verifier of `domain` needs (DOMAINS.md)."""
    if domain not in VERIFIERS:
        raise ValueError(f"unknown domain {domain!r} (no verifier); the built-in domains are {sorted(VERIFIERS)}")
    if not isinstance(meta, dict):
        raise ValueError(f"{domain} meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in VERIFIERS[domain].META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{domain} meta lacks {missing} (see data/DOMAINS.md)")
    VERIFIERS[domain].check_meta(meta)


def score(domain, response, meta):
    """The reward of `response` for a prompt of `domain` with verifier data `meta`, in [0, 1]."""
    check_meta(domain, meta)
    if not isinstance(response, str):  # bytes or None from a caller's decode path
        response = response.decode("utf-8", "replace") if isinstance(response, bytes) else str(response)
    try:
        return float(VERIFIERS[domain].score(response, meta))
    except SandboxError:  # this machine cannot run the sandbox: neither the model's nor the data's fault
        raise
    except Exception:
        # the meta passed its check, so this response hit a verifier bug: it scores 0 rather than
        # killing an RL run (the tests feed every verifier junk directly, so such bugs do not hide here)
        return 0.0


def score_many(domains, responses, metas, workers=None):
    """score() over a batch. Sandboxed domains run in parallel (each verification is a subprocess,
    so threads suffice: the work happens outside the GIL); the rest run inline, they take
    microseconds."""
    if not len(domains) == len(responses) == len(metas):
        raise ValueError(f"score_many: {len(domains)} domains, {len(responses)} responses, {len(metas)} metas")
    scores = [None] * len(domains)
    sandboxed = [i for i, d in enumerate(domains) if d in SANDBOXED]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = {i: pool.submit(score, domains[i], responses[i], metas[i]) for i in sandboxed}
        for i, d in enumerate(domains):
            if i not in futures:
                scores[i] = score(d, responses[i], metas[i])
        for i, future in futures.items():
            scores[i] = future.result()
    return scores
