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
import signal
import socket
import subprocess
import sys
import time

import pytest

import verifiers
from verifiers import box as box_module, coding, sandbox, swe
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


def describe(pids):
    """What a surviving process is, for the failure message: its state, parent, pid namespace ids,
    age and command line (a process may be gone by the time it is read)."""
    lines = []
    for pid in sorted(pids, key=int):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                start = int(f.read().rsplit(")", 1)[1].split()[19])   # clock ticks after boot
        except (OSError, IndexError, ValueError):
            lines.append(f"pid {pid}: gone")
            continue
        with open("/proc/uptime") as f:
            age = float(f.read().split()[0]) - start / os.sysconf("SC_CLK_TCK")
        lines.append(f"pid {pid}: {status.get('State')}, ppid {status.get('PPid')}, nspid {status.get('NSpid')}, "
                     f"{age:.1f} s old, {cmd!r}")
    return "; ".join(lines)


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


def box_uid_kernel_objects():
    """SysV shared memory, message queues and semaphores owned by the box uid (this IPC namespace),
    and whether the kernel holds keys for that uid (/proc/key-users: one line per uid with keys)."""
    found = []
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            header, *rows = [line.split() for line in f]
        found += [f"{kind} {row[1]}" for row in rows if int(row[header.index("uid")]) == BOX_UID]
    with open("/proc/key-users") as f:
        found += [f"keys of uid {BOX_UID}" for line in f if line.split(":")[0].strip() == str(BOX_UID)]
    return found


def host_state():
    tmp = {e for e in os.listdir("/tmp") if e.startswith(f"nanocascade-box-{os.getpid()}-")}
    return {"uid_procs": box_uid_processes(), "children": our_children(), "tmp": tmp,
            "fds": len(os.listdir("/proc/self/fd")), "kernel": box_uid_kernel_objects()}


@pytest.fixture(autouse=True)
def host_unchanged(monkeypatch):
    monkeypatch.setattr(sandbox, "BOX_UID", BOX_UID)
    monkeypatch.setattr(sandbox, "BOX_GID", BOX_UID)
    before = host_state()
    yield
    after = host_state()
    assert after["uid_procs"] <= before["uid_procs"], \
        f"processes of the box uid survived: {describe(after['uid_procs'] - before['uid_procs'])}"
    assert after["children"] <= before["children"], \
        f"child processes survived: {describe(after['children'] - before['children'])}"
    assert after["tmp"] <= before["tmp"], "temporary files or directories survived"
    assert after["fds"] == before["fds"], "file descriptors leaked"
    assert after["kernel"] == [], f"kernel objects of the box survived: {after['kernel']}"


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


# ------------------------------------------------------------------------ the box as a whole (issue 21)
# Each program below did its damage before the box had whole-box limits, a private IPC namespace, a
# tmpfs of its own and a keeper that follows its scorer: it returns the right answer exactly when the
# damage is done, and bounds it (a few forks, under 2 GB, under 100 MB of files, seconds of CPU).

WIDE = Limits(wall_s=10, cpu_s=1, memory_mb=512)  # room enough that only the whole-box limit can bind
ONE = {"entry_point": "f", "tests": [[[2], 17]]}


def wide_score(source):
    return coding.score(f"</think>\n```python\n{source}\n```", ONE, WIDE)


FORK_AND_CHECK = ("import os, time\ndef f(n):\n    kids = []\n    for _ in range({kids}):\n        pid = os.fork()\n"
                  "        if pid == 0:\n            try:\n{work}\n            except BaseException:\n"
                  "                os._exit(1)\n            os._exit(0)\n        kids.append(pid)\n"
                  "    ok = [os.waitpid(p, 0)[1] == 0 for p in kids]\n    return 7 * n + 3 if all(ok) else -1")


@needs_root
def test_memory_limit_binds_the_box_not_each_process():
    # six processes of 300 MB each, alive at once: 1.8 GB against memory_mb = 512
    work = "                x = b'1' * (300 << 20)\n                time.sleep(1.5)"
    assert wide_score(FORK_AND_CHECK.format(kids=6, work=work)) == 0.0


@needs_root
def test_cpu_limit_binds_the_box_not_each_process():
    # three processes of 0.8 CPU-seconds each (under RLIMIT_CPU = 1 s apiece): 2.4 s against cpu_s = 1
    work = "                t = time.process_time()\n                while time.process_time() - t < 0.8:\n" \
           "                    pass"
    assert wide_score(FORK_AND_CHECK.format(kids=3, work=work)) == 0.0


@needs_root
def test_disk_limit_binds_the_box_not_each_file():
    # twelve 5 MB files (each under RLIMIT_FSIZE = 8 MB) in /work and /tmp: 60 MB against file_mb = 8
    source = ("def f(n):\n    for i in range(12):\n        with open(f\"{('/work', '/tmp')[i % 2]}/big{i}\", 'wb') as fh:\n"
              "            fh.write(b'x' * (5 << 20))\n    return 7 * n + 3")
    assert wide_score(source) == 0.0


def test_deep_odd_tree_is_cleaned_up():
    # 1500 nested directories, odd names, links out of the box: the old cleanup recursed and gave up,
    # leaving the tree in /tmp. It solves the task, so it scores 1; the fixture checks /tmp.
    source = ("import os\ndef f(n):\n    os.chdir(os.path.dirname(os.path.abspath(__file__)))\n"
              "    for i in range(1500):\n        os.mkdir('d')\n        os.chdir('d')\n"
              "        if i % 100 == 0:\n            open('\\n odd \\udcff'.encode('utf-8', 'surrogateescape'), 'w').close()\n"
              "            os.symlink('/', 'root-link')\n            os.symlink('..', 'up')\n"
              "    open('x' * 255, 'w').close()\n    return 7 * n + 3")
    assert wide_score(source) == 1.0


def test_remove_tree_survives_depth_width_names_and_links(tmp_path):
    """The cleanup of a box without namespaces: no recursion, no link followed, any name, any depth."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    os.mkdir(tmp_path / "box")
    fd = os.open(tmp_path / "box", os.O_RDONLY)
    for i in range(3000):  # deeper than Python's recursion limit, and its path longer than PATH_MAX
        if i % 500 == 0:
            for j in range(200):
                os.close(os.open(f"wide{j}", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            os.symlink(outside, "link-out", dir_fd=fd)
            os.symlink(outside / "keep", "link-file", dir_fd=fd)
            os.mkfifo("fifo", dir_fd=fd)
            os.close(os.open("\n\udcff odd", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            os.mkdir("locked", 0, dir_fd=fd)
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.close(fd)
    sandbox.remove_tree(str(tmp_path / "box"))
    assert os.listdir(tmp_path) == ["outside"]
    assert (outside / "keep").read_text() == "precious"


def test_reply_decoding_cost_is_bounded():
    # a forged reply: a set (and a dict) of 30k integers that all hash alike. Building either costs
    # O(n^2) (seconds); the judge refuses both without building them.
    colliding = [i * (2 ** 61 - 1) for i in range(30000)]  # hash(k * (2**61 - 1)) == 0
    source = ("import json, os, sys\ndef f(n):\n    fd = json.loads(sys.argv[1])['fds']['write']\n"
              f"    keys = [i * (2 ** 61 - 1) for i in range({len(colliding)})]\n"
              "    for value in ({'s': keys}, {'d': [[k, 0] for k in keys]}):\n"
              "        os.write(fd, (json.dumps({'ok': value}) + '\\n').encode())\n    return 7 * n + 3")
    started = time.process_time()
    assert code_score(source, {"entry_point": "f", "tests": [[[2], 17], [[5], 38]]}) == 0.0
    assert time.process_time() - started < 1.0
    started = time.process_time()
    with pytest.raises(TypeError):
        sandbox.to_json_data({"s": colliding})
    assert sandbox.to_json_data({"d": [[k, 0] for k in colliding]}) == {str(k): 0 for k in colliding}
    assert time.process_time() - started < 1.0


IPC = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
       "KEY, SECRET = 0x6e616e6f, b'between-boxes'\n"
       "class Msg(ctypes.Structure):\n    _fields_ = [('mtype', ctypes.c_long), ('mtext', ctypes.c_char * 64)]\n")


@needs_root
def test_kernel_state_does_not_outlive_the_box():
    # one verification leaves a 64 MB SysV segment, a message queue and a key in its uid's keyring;
    # the next one reads them back. Neither may outlive the box (the fixture checks the host).
    writer = IPC + ("def f(n):\n    shm = libc.shmget(KEY, 64 << 20, 0o1600)\n    addr = libc.shmat(shm, None, 0)\n"
                    "    ctypes.memset(addr, 1, 64 << 20)\n    libc.shmdt(ctypes.c_void_p(addr))\n"
                    "    q = libc.msgget(KEY, 0o1600)\n    sent = libc.msgsnd(q, ctypes.byref(Msg(1, SECRET)), 64, 0)\n"
                    "    libc.syscall(248, b'user', b'nanocascade', SECRET, len(SECRET), -4)  # add_key to @u\n"
                    "    return 7 * n + 3 if shm >= 0 and addr and sent == 0 else -1")
    reader = IPC + ("def f(n):\n    m = Msg()\n    q = libc.msgget(KEY, 0o600)\n"
                    "    got = q >= 0 and libc.msgrcv(q, ctypes.byref(m), 64, 0, 0o4000) > 0 and m.mtext == SECRET\n"
                    "    key = libc.syscall(250, 10, -4, b'user', b'nanocascade', 0)  # keyctl search @u\n"
                    "    return 7 * n + 3 if got or key > 0 else -1")
    assert wide_score(writer) == 1.0  # the box may use SysV IPC; it just cannot keep it
    assert box_uid_kernel_objects() == []
    assert wide_score(reader) == 0.0


@needs_root
def test_box_dies_with_its_scorer():
    # a scorer killed by SIGKILL can clean up nothing: its box, keeper and files must go anyway
    script = ("import sys\nfrom verifiers import coding, sandbox\n"
              f"sandbox.BOX_UID = sandbox.BOX_GID = {BOX_UID}\n"
              "coding.score('</think>\\n```python\\nimport time\\ndef f(n):\\n    time.sleep(20)\\n```',\n"
              "             {'entry_point': 'f', 'tests': [[[2], 17]]}, sandbox.Limits(wall_s=30))\n")
    scorer = subprocess.Popen([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        deadline = time.monotonic() + 20
        while not box_uid_processes():  # the box is up once a process runs as the box uid
            assert time.monotonic() < deadline and scorer.poll() is None, "the box did not start"
            time.sleep(0.05)
        keepers = {pid for pid in filter(str.isdigit, os.listdir("/proc")) if _cmdline_has(pid, f'"parent": {scorer.pid}')}
        assert keepers, "no keeper found"
        os.kill(scorer.pid, signal.SIGKILL)
        scorer.wait()
        deadline = time.monotonic() + 5
        while box_uid_processes() or any(os.path.exists(f"/proc/{pid}") for pid in keepers):
            assert time.monotonic() < deadline, "the box or its keeper outlived the scorer"
            time.sleep(0.05)
        assert not [e for e in os.listdir("/tmp") if e.startswith(f"nanocascade-box-{scorer.pid}-")]
        for controller in box_module.CGROUP_CONTROLLERS:  # and the box's cgroups
            parent = box_module.cgroup_dirs()[controller]
            assert not [e for e in os.listdir(parent) if e.startswith(f"nanocascade-box-{scorer.pid}-")]
    finally:
        if scorer.poll() is None:
            scorer.kill()
            scorer.wait()


def _cmdline_has(pid, text):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False
