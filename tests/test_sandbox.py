"""Red team for the code sandbox (verifiers/sandbox.py, verifiers/box.py).

Every hostile program below must score 0 and leave the host as it was. Most are written so that
they return the *right* answer exactly when their attack works (the memory bomb returns 7n+3 only
if it got its 3 GB, the env reader returns the parent's secret if it can see it), so a hole in the
sandbox turns into a failing test, not a silent pass. The damage each can do is bounded by the
program itself (a few hundred forks, a few GB, a few files), so a sandbox bug cannot take the
machine down. After each test a fixture checks that no process of the box's uid, no child of this
process, no box directory and no extra file descriptor of ours is left behind.
"""
import os
import socket
import time

import pytest

import verifiers
from verifiers import coding, sandbox, swe
from verifiers.sandbox import Limits, run_function_tests

LIMITS = Limits(wall_s=3, cpu_s=1, memory_mb=512)
# the hidden test: f(n) = 7n + 3; the expected values never enter the box
META = {"entry_point": "f", "tests": [[[2], 17], [[5], 38]]}
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="namespaces and the uid drop need root")


# Other runs on this machine may use the sandbox at the same time as uid 65534: this test process
# gives its boxes a uid of their own, so that counting what survives counts only ours.
BOX_UID = 60000 + os.getpid() % 5000


def box_uid_processes():
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if int(uid) == BOX_UID:
            found.add(pid)
    return found


def our_children():
    children = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid():
            children.add(pid)
    return children


def host_state():
    tmp = {e for e in os.listdir("/tmp") if e.startswith(f"nanocascade-box-{os.getpid()}-")}
    return {"uid_procs": box_uid_processes(), "children": our_children(), "tmp": tmp,
            "fds": len(os.listdir("/proc/self/fd"))}


@pytest.fixture(autouse=True)
def host_unchanged(monkeypatch):
    monkeypatch.setattr(sandbox, "BOX_UID", BOX_UID)
    monkeypatch.setattr(sandbox, "BOX_GID", BOX_UID)
    before = host_state()
    yield
    after = host_state()
    assert after["uid_procs"] <= before["uid_procs"], "processes of the box uid survived"
    assert after["children"] <= before["children"], "child processes survived"
    assert after["tmp"] <= before["tmp"], "temporary files or directories survived"
    assert after["fds"] == before["fds"], "file descriptors leaked"


def code_score(source, meta=META):
    return coding.score(f"</think>\n```python\n{source}\n```", meta, LIMITS)


def test_control_correct_solution_passes():
    assert code_score("def f(n):\n    return 7 * n + 3") == 1.0


KILLER = ("import os, signal\ndef f(n):\n    for pid in (os.getppid(), 1, -1, 0):\n        try:\n"
          "            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n")
HOSTILE = {
    "sys_exit_at_import": "import sys\nsys.exit(0)",
    "os_exit_at_import": "import os\nos._exit(0)",
    "exit_inside_function": "import sys\ndef f(n):\n    sys.exit(0)",
    "os_exit_inside_function": "import os\ndef f(n):\n    os._exit(0)",
    "always_equal_object": "class E:\n    def __eq__(self, o): return True\n    __hash__ = None\n"
                           "def f(n):\n    return E()",
    "int_subclass_liar": "class I(int):\n    def __eq__(self, o): return True\ndef f(n):\n    return I(0)",
    "patched_builtins_and_json": "import builtins, json\nbuiltins.isinstance = lambda *a: True\n"
                                 "builtins.len = lambda x: 0\njson.dumps = lambda *a, **k: '{\"ok\": 17}'\n"
                                 "json.loads = lambda *a, **k: {'ok': 17}\ndef f(n):\n    return 0",
    "patched_assert_and_unittest": "import builtins, unittest\nbuiltins.AssertionError = type('A', (Exception,), {})\n"
                                   "unittest.TestCase.assertEqual = lambda *a: None\ndef f(n):\n    return 0",
    "prints_fake_pass": "print('PASSED 2/2'); print('{\"passed\": 2, \"total\": 2, \"failures\": []}')\n"
                        "def f(n):\n    print('ok'); return None",
    "forged_replies_on_every_fd": "import os\nfor fd in range(64):\n    try:\n"
                                  "        os.write(fd, b'{\"ok\": 17, \"callable\": false}\\n' * 4)\n"
                                  "    except OSError:\n        pass\ndef f(n):\n    return -1",
    "reads_expected_from_frames_and_gc": "import gc, sys\ndef f(n):\n    fr = sys._getframe()\n    while fr:\n"
                                         "        for v in fr.f_locals.values():\n"
                                         "            if v in (17, 38) and v != n: return v\n        fr = fr.f_back\n"
                                         "    for o in gc.get_objects():\n"
                                         "        if isinstance(o, list) and [2] in o: return o[1]\n    return -1",
    "infinite_loop": "def f(n):\n    while True:\n        pass",
    "burns_cpu_then_answers": "import time\ndef f(n):\n    t = time.time()\n    while time.time() - t < 20:\n"
                              "        pass\n    return 7 * n + 3",
    "sleeps_then_answers": "import time\ndef f(n):\n    time.sleep(20)\n    return 7 * n + 3",
    "ignores_sigterm_and_cancels_timers": "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM,"
                                          " signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\n"
                                          "signal.alarm(0)\nsignal.setitimer(signal.ITIMER_REAL, 0)\n"
                                          "def f(n):\n    time.sleep(20)\n    return 7 * n + 3",
    "memory_bomb": "def f(n):\n    x = bytearray(3 << 30)\n    x[-1] = 1\n    return 7 * n + 3",
    "fork_bomb_bounded": "import os, time\ndef f(n):\n    made = 0\n    for _ in range(300):\n        try:\n"
                         "            pid = os.fork()\n        except OSError:\n            continue\n"
                         "        if pid == 0:\n            time.sleep(30)\n            os._exit(0)\n        made += 1\n"
                         "    return 7 * n + 3 if made == 300 else -1",
    "setsid_escape": "import os, time\ndef f(n):\n    if os.fork() == 0:\n        os.setsid()\n"
                     "        if os.fork() == 0:\n            time.sleep(60)\n        os._exit(0)\n    return -1",
    "huge_output": "import sys\ndef f(n):\n    while True:\n        sys.stdout.write('x' * 65536)",
    "kills_its_parent_and_everyone": KILLER + "    return -1",
    "spawns_a_shell": "import subprocess\ndef f(n):\n    subprocess.run(['/bin/sh', '-c', 'echo pwned'], check=True)\n"
                      "    return 7 * n + 3",
    "deep_recursion_result": "def f(n):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x",
    "self_referencing_result": "def f(n):\n    x = []\n    x.append(x)\n    return x",
    "not_a_function": "f = 17",
    "fd_exhaustion": "import os\nfds = []\ntry:\n    while True:\n        fds.append(os.open('/work', os.O_RDONLY))\n"
                     "except OSError:\n    pass\ndef f(n):\n    return -1",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero(name):
    started = time.monotonic()
    assert code_score(HOSTILE[name]) == 0.0
    assert time.monotonic() - started < LIMITS.wall_s + 6  # the deadline holds, SIGTERM or not


def test_killer_cannot_break_the_verification():
    # it signals everything it can see; this process lives on, and a correct answer still counts
    assert code_score(KILLER + "    return 7 * n + 3") == 1.0


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    source = (f"import socket\ndef f():\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
              f"    return 'connected'")
    try:
        if ROOT:
            assert code_score(source, {"entry_point": "f", "tests": [[[], "connected"]]}) == 0.0
            with pytest.raises(BlockingIOError):
                server.accept()  # nobody knocked
        else:
            pytest.skip("network namespaces need root")
    finally:
        server.close()


def test_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("NANOCASCADE_SECRET", "s3cr3t-42")
    source = ("import os\ndef f():\n    found = os.environ.get('NANOCASCADE_SECRET')\n"
              "    for pid in ('1', str(os.getppid()), 'self'):\n        try:\n"
              "            env = open(f'/proc/{pid}/environ', 'rb').read()\n        except OSError:\n            continue\n"
              "        if b's3cr3t-42' in env:\n            found = 's3cr3t-42'\n    return found")
    assert code_score(source, {"entry_point": "f", "tests": [[[], "s3cr3t-42"]]}) == 0.0


@needs_root
def test_host_files_are_invisible_and_untouched():
    canary = f"/tmp/nanocascade-canary-{os.getpid()}"
    with open(canary, "w") as f:
        f.write("precious")
    os.chmod(canary, 0o666)  # even a world-writable file must be out of reach
    try:
        read = f"def f():\n    return open('{canary}').read()"
        assert code_score(read, {"entry_point": "f", "tests": [[[], "precious"]]}) == 0.0
        vandal = (f"import os, shutil\ndef f():\n    n = 0\n    for p in ('{canary}', '/work/../etc/hostname'):\n"
                  f"        try:\n            os.remove(p); n += 1\n        except OSError:\n            pass\n"
                  f"    for p in ('/tmp/nanocascade-pwned', '/var/tmp/nanocascade-pwned', '/dev/shm/nanocascade-pwned',"
                  f" '{os.getcwd()}/nanocascade-pwned'):\n        try:\n"
                  f"            open(p, 'w').write('x'); n += 1\n        except OSError:\n            pass\n"
                  f"    return 'vandalized' if n else 'no'")
        # writing its own /tmp is allowed (it vanishes with the box): the score says it wrote something
        assert code_score(vandal, {"entry_point": "f", "tests": [[[], "no"]]}) == 0.0
        with open(canary) as f:
            assert f.read() == "precious"
        for p in ("/tmp/nanocascade-pwned", "/var/tmp/nanocascade-pwned", "/dev/shm/nanocascade-pwned",
                  f"{os.getcwd()}/nanocascade-pwned"):
            assert not os.path.exists(p)
        # the repository and its data are not in the box at all
        peek = f"import os\ndef f():\n    return os.path.exists('{os.path.abspath(__file__)}') or os.path.exists('/proc/1')"
        assert code_score(peek, {"entry_point": "f", "tests": [[[], True]]}) == 0.0
    finally:
        os.remove(canary)


@needs_root
def test_runs_unprivileged():
    probe = "import os\ndef f():\n    return [os.getuid(), os.getgid(), os.getgroups()]"
    assert run_function_tests(probe, "f", [[[], [BOX_UID, BOX_UID, []]]], LIMITS) == 1


# ---------------------------------------------------------------------------------------------- swe

SWE_META = {"files": {"module.py": "def add(a, b):\n    return a - b\n"},
            "tests": "from module import add\n\ndef test_add():\n    assert add(1, 2) == 3\n    assert add(2, 2) == 4\n"}


def swe_patch(body):
    """A patch that replaces add() by `body` (the module's whole text after the patch)."""
    return ("module.py\n<<<<<<< SEARCH\ndef add(a, b):\n    return a - b\n=======\n"
            f"{body}\n>>>>>>> REPLACE")


SWE_HOSTILE = {
    "exit_at_import": "import sys\nsys.exit(0)\ndef add(a, b):\n    return a - b",
    "os_exit_at_import": "import os\nos._exit(0)",
    "always_equal": "class E:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return E()",
    "fake_verdict_on_every_fd": "import os\nfor fd in range(64):\n    try:\n"
                                "        os.write(fd, b'{\"passed\": 1, \"total\": 1, \"failures\": []}\\n')\n"
                                "    except OSError:\n        pass\ndef add(a, b):\n    return a - b",
    "patches_assert_machinery": "import builtins\nbuiltins.AssertionError = type('A', (BaseException,), {})\n"
                                "builtins.Exception = BaseException\ndef add(a, b):\n    return None",
    "hangs": "def add(a, b):\n    while True:\n        pass",
}


@pytest.mark.parametrize("name", sorted(SWE_HOSTILE))
def test_hostile_swe_patch_scores_zero(name):
    assert swe.score("</think>\n" + swe_patch(SWE_HOSTILE[name]), SWE_META, LIMITS) == 0.0


PARITY = "def is_even(n):\n    return n % 2 == 1\n\n\ndef odds_below(n):\n    return [k for k in range(n) if k % 2 == 0]"
PARITY_META = {"files": {"parity.py": PARITY + "\n"},
               "tests": "from parity import is_even, odds_below\n\ndef test_even():\n    assert is_even(4)\n"
                        "    assert is_even(0)\n\ndef test_odds():\n    assert 3 in odds_below(5)\n"}


def test_swe_handles_cannot_answer_truth_or_membership():
    """A returned object is a handle in the tests box. If its truth value or `in` were asked of the
    model's object, one whose __len__ says 1 and whose __contains__ says True would pass these
    tests without computing anything; instead both raise TypeError, and the tests fail."""
    def score(source):  # a patch that replaces the whole module by `source`
        return swe.score(f"</think>\nparity.py\n<<<<<<< SEARCH\n{PARITY}\n=======\n{source}\n>>>>>>> REPLACE",
                         PARITY_META, LIMITS)
    assert score(PARITY.replace("== 1", "== 0").replace("== 0]", "== 1]")) == 1.0  # the real fix
    liar = ("class Liar:\n    def __len__(self):\n        return 1\n\n    def __contains__(self, x):\n"
            "        return True\n\n\ndef is_even(n):\n    return Liar()\n\n\nodds_below = is_even")
    assert score(liar) == 0.0


@pytest.mark.parametrize("path", ["/tmp/module.py", "../module.py", "test_module.py", "module.py/../../x.py"])
def test_swe_patch_outside_the_module_is_refused(path):
    meta = SWE_META | {"files": SWE_META["files"] | {"test_module.py": "def add(a, b):\n    return a - b\n"}}
    patch = swe_patch("def add(a, b):\n    return a + b").replace("module.py\n<<<", f"{path}\n<<<", 1)
    assert swe.score("</think>\n" + patch, meta, LIMITS) == 0.0
    assert swe.score("</think>\n" + swe_patch("def add(a, b):\n    return a + b"), SWE_META, LIMITS) == 1.0


def test_pool_under_attack():
    """A batch mixing correct, wrong and hostile programs: the hostile ones cost no correct one its
    reward, and nothing survives the pool."""
    programs = ["def f(n):\n    return 7 * n + 3", HOSTILE["fork_bomb_bounded"], HOSTILE["memory_bomb"],
                "def f(n):\n    return 7 * n + 3", HOSTILE["always_equal_object"], "def f(n):\n    return n"]
    responses = [f"</think>\n```python\n{p}\n```" for p in programs]
    assert verifiers.score_many(["code"] * len(programs), responses, [META] * len(programs), workers=3) \
        == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
