"""How many sandboxed verifications per second does verifiers.score_many sustain?

    python bench/sandbox.py              # code and swe, 1..N workers, 48 verifications each
    python bench/sandbox.py --n 96 --workers 1 2 4

Each verification is a fresh box: a `python -I -S` process, new mount/IPC/network/PID namespaces,
its cgroups, a tmpfs root, the seccomp filter, the uid drop, the tests, teardown. Half of the responses are right and half wrong, as in an RL batch.
The figure bounds how fast code/SWE RL can score rollouts on this machine; the "(python)" rows
start a bare interpreter as often, the floor of any process-per-verification design.
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import verifiers  # noqa: E402

CODE_META = {"entry_point": "double_all", "tests": [[[[1, 2]], [2, 4]], [[[]], []], [[[-3, 5]], [-6, 10]]]}
CODE_RIGHT = "```python\ndef double_all(xs):\n    return [2 * x for x in xs]\n```"
CODE_WRONG = "```python\ndef double_all(xs):\n    return [x * x for x in xs]\n```"
SWE_META = {"files": {"module.py": "def add(a, b):\n    return a - b\n\n\ndef neg(a):\n    return -a\n"},
            "tests": "from module import add, neg\n\ndef test_add():\n    assert add(1, 2) == 3\n\n"
                     "def test_neg():\n    assert neg(2) == -2\n"}
SWE_RIGHT = "module.py\n<<<<<<< SEARCH\n    return a - b\n=======\n    return a + b\n>>>>>>> REPLACE"
SWE_WRONG = SWE_RIGHT.replace("a + b", "a * b")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48, help="verifications per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}),
                        help="pool sizes to measure")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}  root: {os.geteuid() == 0}  verifications per row: {args.n}")
    print(f"{'domain':<8}{'workers':>8}{'seconds':>10}{'verif/s':>10}{'ms each':>10}")
    # the floor: starting a bare `python -I -S` as many times, through the same kind of pool
    for workers in args.workers:
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda _: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"]), range(args.n)))
        seconds = time.perf_counter() - start
        print(f"{'(python)':<8}{workers:>8}{seconds:>10.2f}{args.n / seconds:>10.1f}{1000 * seconds / args.n:>10.0f}")
    cases = {"code": (CODE_META, CODE_RIGHT, CODE_WRONG), "swe": (SWE_META, SWE_RIGHT, SWE_WRONG)}
    for domain, (meta, right, wrong) in cases.items():
        responses = [f"</think>\n{right if i % 2 == 0 else wrong}" for i in range(args.n)]
        expected = [1.0 if i % 2 == 0 else 0.0 for i in range(args.n)]
        for workers in args.workers:
            start = time.perf_counter()
            scores = verifiers.score_many([domain] * args.n, responses, [meta] * args.n, workers=workers)
            seconds = time.perf_counter() - start
            assert scores == expected, f"{domain}: wrong scores {scores}"
            print(f"{domain:<8}{workers:>8}{seconds:>10.2f}{args.n / seconds:>10.1f}{1000 * seconds / args.n:>10.0f}")


if __name__ == "__main__":
    main()
