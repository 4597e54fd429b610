"""
JSONL in and out: the three data formats, validated line by line.

    sft    {"messages": [...], "domain": "math"}                   one training conversation
    rl     {"domain": "math", "messages": [...], "meta": {...}}    one prompt plus what its verifier needs
    prefs  {"messages": [...], "chosen": "...", "rejected": "..."}  one preference pair

Messages are the OpenAI / Hugging Face chat format: {"role": system|user|assistant|tool,
"content": str}; an assistant turn may carry "reasoning" or "reasoning_content" (its thinking trace)
and "tool_calls" ([{"name": str, "arguments": {...}}], or OpenAI's [{"type": "function", "function":
{"name": str, "arguments": {...} or a JSON string}}]); a record may carry "tools" (JSON-schema
declarations). data.chat.message reads both spellings.

A user's own file goes through exactly the checks our generated files do, and the first problem
stops the load with `ValueError("path:line: what is wrong")`: a mistake in line 40,000 of a file
should cost a second to find, not a crash deep inside a training step.
"""

import json
import os

# the modules, not names from them: verifiers imports data.chat, so either package may be loading first
import verifiers
from data import chat

ROLES = ("system", "user", "assistant", "tool")
# The longest line a file may have, in bytes: 8 MiB is about 2M tokens of text, 8x the paper's
# longest packed row (256K tokens). Parsing costs far more memory than the text (a 30 MB line took
# 7.9 GB), so a longer line is refused before it is parsed: it is a file gone wrong (a missing
# newline joining lines, a binary blob), not a conversation.
MAX_LINE_BYTES = 8 << 20
REQUIRED_KEYS = {"sft": ("messages",), "rl": ("domain", "messages", "meta"),
                 "prefs": ("messages", "chosen", "rejected")}


def _check_messages(msgs, kind):
    """Raise ValueError(reason) if `msgs` is not a well-formed conversation for `kind`."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError('"messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r} is not one of {list(ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: a system message may only come first")
        if "content" not in m:
            raise ValueError(f'{where}: missing key "content"')
        calls = m.get("tool_calls")
        if not isinstance(m["content"], str) and not (m["content"] is None and calls):
            raise ValueError(f'{where}: "content" must be a string, got {type(m["content"]).__name__}')
        reasoning = [k for k in ("reasoning", "reasoning_content") if m.get(k) is not None]
        if role != "assistant" and (reasoning or calls is not None):
            raise ValueError(f'{where}: only assistant messages may carry "{(reasoning or ["tool_calls"])[0]}"')
        if len(reasoning) == 2:
            raise ValueError(f'{where}: give "reasoning" or "reasoning_content", not both')
        if reasoning and not isinstance(m[reasoning[0]], str):
            raise ValueError(f'{where}: "{reasoning[0]}" must be a string')
        if calls is not None:
            if not isinstance(calls, list):
                raise ValueError(f'{where}: "tool_calls" must be a list')
            for j, c in enumerate(calls):
                try:
                    chat.tool_call(c)
                except ValueError as e:
                    raise ValueError(f"{where}.tool_calls[{j}]: {e}") from None
        if role == "tool":
            prev = msgs[i - 1] if i else {}
            if not (prev.get("role") == "tool" or prev.get("tool_calls")):
                raise ValueError(f"{where}: a tool message must follow an assistant message with tool_calls")
    roles = [m["role"] for m in msgs]
    if kind == "sft" and "assistant" not in roles:
        raise ValueError("an SFT conversation needs at least one assistant message (nothing to train on)")
    if kind in ("rl", "prefs") and roles[-1] != "user":
        raise ValueError(f"a prompt's messages must end with a user message, not {roles[-1]!r}")


def check_record(rec, kind):
    """Raise ValueError(reason) if `rec` is not a valid record of `kind` ("sft", "rl" or "prefs")."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    for key in REQUIRED_KEYS[kind]:
        if key not in rec:
            raise ValueError(f"missing key {key!r} (a {kind} record needs {list(REQUIRED_KEYS[kind])})")
    _check_messages(rec["messages"], kind)
    if "tools" in rec and not (isinstance(rec["tools"], list) and all(isinstance(t, dict) for t in rec["tools"])):
        raise ValueError('"tools" must be a list of objects (JSON-schema function declarations)')
    if "domain" in rec and not isinstance(rec["domain"], str):
        raise ValueError('"domain" must be a string')
    if kind == "rl":  # the verifier's own check: what its meta must hold (data/DOMAINS.md)
        verifiers.check_meta(rec["domain"], rec["meta"])
    if kind == "prefs":
        for key in ("chosen", "rejected"):
            if not isinstance(rec[key], str):
                raise ValueError(f"{key!r} must be a string, got {type(rec[key]).__name__}")


def load_jsonl(path, kind, domain=None):
    """Read and validate a JSONL file of `kind` ("sft", "rl" or "prefs") -> list of dicts; with
    `domain`, a file of that domain's rows only (DATA/rl/<domain>.jsonl, DATA/eval/<domain>.jsonl).
    Blank lines are skipped; any other problem raises ValueError("path:line: reason")."""
    if kind not in REQUIRED_KEYS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(REQUIRED_KEYS)}")
    records = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported like any other bad line
        # (readline with a cap: a file with no newline at all is never read whole)
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{lineno}: the line is longer than {MAX_LINE_BYTES:,} bytes "
                                 f"(data/jsonl.py's MAX_LINE_BYTES): a missing newline, or not JSONL")
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text: byte {e.start + 1} of the line is "
                                 f"{raw[e.start:e.start + 1]!r}") from None
            except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
                raise ValueError(f"{path}:{lineno}: invalid JSON: {type(e).__name__}: {str(e)[:200]}") from None
            try:
                check_record(rec, kind)
                if domain is not None and rec["domain"] != domain:
                    raise ValueError(f"a row of domain {rec['domain']!r} in a file of domain {domain!r}")
            except (ValueError, RecursionError) as e:  # RecursionError: a deep structure in a checked field
                raise ValueError(f"{path}:{lineno}: {e}") from None
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


def write_jsonl(path, records):
    """Write records one JSON object per line, atomically (temp file in the same directory, then
    rename): an interrupted write leaves no file, never a truncated one that looks complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
