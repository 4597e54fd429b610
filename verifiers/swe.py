"""The `swe` verifier: apply the model's SEARCH/REPLACE patch, then run the hidden tests.

Patch format (DOMAINS.md), one or more blocks:

    module.py
    <<<<<<< SEARCH
        return a - b
    =======
        return a + b
    >>>>>>> REPLACE

The path is the last non-blank line before `<<<<<<< SEARCH` (a ``` fence line is skipped). A patch
is refused — reward 0 — if a block is malformed, names a file that is not in the module (this also
rules out absolute paths, `..` and anything a symlink could point to: only the known files exist),
touches a test file, or its SEARCH text does not occur exactly once. Otherwise the patched files and
the tests go to the sandbox (sandbox.run_module_tests), and the reward is 1 iff every test_* passes.
"""
import posixpath
import re

from data.chat import parse_response
from verifiers.sandbox import Limits, run_module_tests


class PatchError(ValueError):
    pass


def parse_patch(text):
    """Patch text -> [(path, search, replace)]; PatchError if there is no well-formed block."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "<<<<<<< SEARCH":
            i += 1
            continue
        before = [l.strip() for l in lines[:i] if l.strip() and not l.strip().startswith("```")]
        try:
            mid = lines.index("=======", i + 1)
            end = lines.index(">>>>>>> REPLACE", mid + 1)
        except ValueError:
            raise PatchError("a SEARCH block without its ======= / >>>>>>> REPLACE lines") from None
        if not before:
            raise PatchError("a SEARCH block without a file path before it")
        blocks.append((before[-1], "\n".join(lines[i + 1:mid]), "\n".join(lines[mid + 1:end])))
        i = end + 1
    if not blocks:
        raise PatchError("no SEARCH/REPLACE block")
    return blocks


def is_test_file(path):
    name = posixpath.basename(path)
    return name.startswith("test_") or name.endswith("_test.py") or name in ("tests.py", "conftest.py")


def apply_patch(files, patch_text):
    """A patched copy of `files` ({path: source}); PatchError if the patch must be refused."""
    patched = dict(files)
    for path, search, replace in parse_patch(patch_text):
        if path not in patched:
            raise PatchError(f"{path!r} is not a file of the module")
        if is_test_file(path):
            raise PatchError(f"{path!r} is a test file")
        source = patched[path]
        first = source.find(search) if search else -1
        if first == -1 or source.find(search, first + 1) != -1:
            raise PatchError(f"the SEARCH text must occur exactly once in {path!r}")
        patched[path] = source[:first] + replace + source[first + len(search):]
    return patched


META_KEYS = ("files", "tests")   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta['files'] maps relative, normalized paths to sources and
    meta['tests'] is test source that compiles and defines a test_ function."""
    files, tests = meta["files"], meta["tests"]
    if not (isinstance(files, dict) and files and all(isinstance(v, str) for v in files.values())):
        raise ValueError("swe meta: files must be a non-empty object {path: source}")
    for path in files:
        if posixpath.isabs(path) or posixpath.normpath(path) != path or path.startswith(".."):
            raise ValueError(f"swe meta: file path {path!r} must be relative and normalized")
    if not isinstance(tests, str):
        raise ValueError(f"swe meta: tests must be test source, got {type(tests).__name__}")
    try:
        compile(tests, "<swe meta tests>", "exec")  # a broken test file is our bug, not a 0 reward
    except SyntaxError as e:
        raise ValueError(f"swe meta: the tests do not compile: {e}") from None
    if not re.search(r"^def test_", tests, re.M):  # no test would mean no verdict: every patch scores 0
        raise ValueError("swe meta: the tests define no test_ function")


def score(response, meta, limits=Limits()):
    """1.0 iff the patch applies cleanly and every test_* in meta['tests'] passes, else 0.0."""
    try:
        patched = apply_patch(meta["files"], parse_response(response)["answer"])
    except PatchError:
        return 0.0
    verdict = run_module_tests(patched, meta["tests"], limits)
    return float(verdict is not None and verdict[1] > 0 and verdict[0] == verdict[1])
