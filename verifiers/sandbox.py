"""The code sandbox: run model-written Python against hidden tests, with a verdict it cannot forge.

RL on code teaches a model whatever the reward allows, and a reward that can be fooled will be:
`sys.exit(0)` before the tests, an object whose `__eq__` is always True, a patched `assert`, a
printed "PASSED", a killed timer. So the design starts from one rule:

    The process that decides the verdict never runs model code, and model code can send it nothing
    but plain data.

- `code`: the parent (this process) is the judge. The model's function lives in a box; the parent
  sends each test's arguments, the box returns `entry_point(*args)` *encoded as plain data*
  (box.encode: exact builtin types only, so an always-equal object cannot be sent as a value), and
  the parent compares with the expected value, which never enters the box. An early exit, a printed
  line or a patched builtin in the box yields no correct value, so no reward.
- `swe`: the tests are code, so they run in a second box, "tests", where no model code runs: the
  module under test is a proxy whose attribute reads and calls are requests to the "serve" box
  holding the patched module, answered with plain data. The assertions, `==` included, are
  evaluated on those plain values in the tests box, and its verdict goes to a pipe that only the
  parent and the tests box hold. Limitations: a test must talk to the module through calls and
  attribute reads (objects come back as handles); since arguments are copied, an in-place mutation
  of an argument is not seen by the test; and a handle has no truth value and no `in` (both raise
  TypeError, failing the test), since the model's object would decide them: a test asserts on
  plain values (`assert f(3) is True`, `assert x in obj.items`), as our generated tests do.

The box itself (box.py, read next) is a fresh process per verification: `python -I -S` (nothing of
ours importable), an empty environment, stdin closed, output to a capped unnamed file, and as root
new mount/IPC/network/PID namespaces, cgroups that bound memory, processes and CPU time of the box as
a whole, a tmpfs root of file_mb MB with only /work, /tmp and read-only system libraries, rlimits,
no keyring system calls, and uid/gid 65534. The parent holds the wall-clock deadline; the keeper
process tears the box down, the kernel kills everything inside when its PID 1 dies, and the keeper
itself is stopped by the kernel when this process dies, even by SIGKILL: nothing of a box, not a
process, a file, a SysV object or a key, outlives its verification.

`Box` is one box; `run_function_tests` and `run_module_tests` are the two uses above.
"""
import functools
import itertools
import json
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from verifiers import box as box_module
from verifiers.box import encode

BOX_SCRIPT = os.path.abspath(box_module.__file__)
_box_numbers = itertools.count()
BOX_UID = BOX_GID = 65534  # nobody / nogroup (the red-team tests pick their own, to count processes)


@dataclass
class Limits:
    wall_s: float = 10.0     # the parent's deadline for a whole verification
    cpu_s: int = 5           # CPU seconds: all of the box's processes together (cgroup), and each (RLIMIT_CPU)
    memory_mb: int = 1024    # memory of the box (cgroup), and address space of each process (RLIMIT_AS,
                             # the interpreter included, ~30 MB)
    file_mb: int = 8         # size of the box's tmpfs: all it can write; RLIMIT_FSIZE: also caps the output
    nproc: int = 64          # processes of the box (cgroup), and RLIMIT_NPROC, per uid across all boxes
    nofile: int = 64         # RLIMIT_NOFILE


class SandboxError(RuntimeError):
    """The sandbox could not be set up: a problem of this machine, not of the model's code."""


class Timeout(Exception):
    pass


@functools.cache
def namespaces_available():
    """Can this machine build the full box (root, and unshare of the mount, IPC, PID and network
    namespaces permitted)? Asked once per process, of a throwaway `box.py probe`."""
    return os.geteuid() == 0 and subprocess.run(
        [sys.executable, "-I", "-S", BOX_SCRIPT, "probe"], env={}, stdin=subprocess.DEVNULL).returncode == 0


def remove_tree(path):
    """Remove directory `path` and all under it, whatever the box left there: no recursion (depth),
    one open directory at a time (count), names only relative to a directory descriptor (no
    PATH_MAX, any bytes), and no symbolic link followed. Used by the fallback box only; with
    namespaces the box's files live and die in its own tmpfs."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(path, flags)
    below = [None]  # per level from the top: subdirectories still to remove (None: not yet listed)
    names, inodes = [], [os.fstat(fd).st_ino]  # the way down, to climb back up by ".." and check it
    try:
        while True:
            if below[-1] is None:
                below[-1] = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            below[-1].append(entry.name)
                        else:
                            os.unlink(entry.name, dir_fd=fd)
            if below[-1]:
                name = below[-1].pop()
                try:
                    os.chmod(name, stat.S_IRWXU, dir_fd=fd)  # without root, a mode-0 directory
                except OSError:
                    pass
                fd, parent = os.open(name, flags, dir_fd=fd), fd
                os.close(parent)
                names.append(name)
                inodes.append(os.fstat(fd).st_ino)
                below.append(None)
            elif names:
                fd, child = os.open("..", flags, dir_fd=fd), fd
                os.close(child)
                inodes.pop()
                if os.fstat(fd).st_ino != inodes[-1]:
                    raise RuntimeError(f"remove_tree: {path} was moved while being removed")
                os.rmdir(names.pop(), dir_fd=fd)
                below.pop()
            else:
                break
    finally:
        os.close(fd)
    os.rmdir(path)


class _Channel:
    """The parent's end of a box's pipes: JSON lines, every read and write bounded by a deadline."""

    def __init__(self, read_fd, write_fd, deadline, max_bytes=1 << 24):
        self.read_fd, self.write_fd, self.deadline, self.max_bytes = read_fd, write_fd, deadline, max_bytes
        self.buffer = b""
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)

    def _wait(self, fd, event):
        # poll, not select: a training process may hold more than select's 1024 descriptors
        left = self.deadline - time.monotonic()
        poller = select.poll()
        poller.register(fd, event)
        if left <= 0 or not poller.poll(left * 1000):
            raise Timeout()

    def send(self, message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            self._wait(self.write_fd, select.POLLOUT)
            data = data[os.write(self.write_fd, data):]

    def recv(self):
        """The next message; EOFError if the box closed its end, ValueError if it is not JSON."""
        while (end := self.buffer.find(b"\n")) == -1:
            if len(self.buffer) > self.max_bytes:
                raise ValueError("message too long")
            self._wait(self.read_fd, select.POLLIN)
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise EOFError()
            self.buffer += chunk
        line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
        return json.loads(line)


class Box:
    """One sandboxed process (see box.py): `with Box("serve", files, limits) as b: b.channel...`.

    `files` ({relative path: text}) are written to the box's /work. `peer_fds` = (read, write) makes
    the box talk to another box instead of to this process; `verdict` asks for one more pipe, on
    which a tests box writes its result (self.verdict_fd, the read end). A box lives no longer than
    the thread that made it: the kernel's parent-death signal follows the thread, not the process."""

    def __init__(self, role, files, limits, peer_fds=None, verdict=False, extra=None):
        namespaces = namespaces_available()
        self.dir = self.proc = self.output = self.channel = self.verdict_fd = None
        self.cgroups = {}
        opened = []
        try:
            for path in files:
                if os.path.isabs(path) or ".." in path.split("/") or os.path.normpath(path) != path:
                    raise ValueError(f"sandbox: file path {path!r} must be relative and normalized")
            # the files travel in an anonymous memory file, the output goes to an unnamed file: with
            # namespaces the box has no name on the host at all, so a scorer killed by SIGKILL
            # leaves nothing behind
            files_fd = os.memfd_create("box-files")
            opened.append(files_fd)
            os.write(files_fd, json.dumps(files).encode())
            os.lseek(files_fd, 0, os.SEEK_SET)
            self.output = tempfile.TemporaryFile()
            if namespaces:  # named after this process, so a later one can sweep them if it is killed
                self.cgroups = box_module.make_cgroups(asdict(limits), f"{box_module.CGROUP_PREFIX}"
                                                       f"{os.getpid()}-{next(_box_numbers)}")
            else:  # the fallback works in a directory of the host's /tmp
                self.dir = tempfile.mkdtemp(prefix=f"nanocascade-box-{os.getpid()}-")
                os.mkdir(os.path.join(self.dir, "work"), 0o700)
                if os.geteuid() == 0:  # the box dir is traversable, its work dir belongs to the box's user
                    os.chmod(self.dir, 0o711)
                    os.chown(os.path.join(self.dir, "work"), BOX_UID, BOX_GID)
            if peer_fds is None:
                to_box_r, to_box_w = os.pipe()
                from_box_r, from_box_w = os.pipe()
                opened += [to_box_r, from_box_w]
                child_fds = {"read": to_box_r, "write": from_box_w}
            else:
                child_fds = {"read": peer_fds[0], "write": peer_fds[1]}
            child_fds["files"] = files_fd
            if verdict:
                self.verdict_fd, verdict_w = os.pipe()
                opened.append(verdict_w)
                child_fds["verdict"] = verdict_w
            config = dict(role=role, box=self.dir, namespaces=namespaces, cgroups=self.cgroups,
                          parent=os.getpid(), uid=BOX_UID,
                          gid=BOX_GID, limits=asdict(limits), fds=child_fds, **(extra or {}))
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", BOX_SCRIPT, json.dumps(config)], cwd=self.dir or "/", env={},
                stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
                pass_fds=list(child_fds.values()), start_new_session=True)
            try:  # the keeper into the box's cgroups while its interpreter starts (see box.py)
                box_module.move_to_cgroups(self.cgroups, self.proc.pid)
            except OSError:
                pass  # it died already, or it will move itself
            if peer_fds is None:
                self.channel = _Channel(from_box_r, to_box_w, time.monotonic() + limits.wall_s)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in opened:  # the child's ends: ours must close or EOF never comes
                os.close(fd)

    def output_tail(self, n=2000):
        size = os.fstat(self.output.fileno()).st_size
        return os.pread(self.output.fileno(), n, max(0, size - n)).decode(errors="replace")

    def wait_boot(self):
        """Wait for the box's 'boot' message: it is sent before any model code runs, so failing
        here means the sandbox itself is broken (SandboxError), not the model."""
        try:
            ok = self.channel.recv() == {"boot": "ok"}
        except (EOFError, ValueError, Timeout):
            ok = False
        if not ok:
            raise SandboxError(f"the sandbox did not start; its output:\n{self.output_tail()}")

    def close(self):
        """Stop the box (the keeper kills its PID namespace: its tmpfs and IPC objects go with it) and,
        without namespaces, remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the keeper kills the box, then exits
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                # only without namespaces (same uid) could the box have stopped its keeper; kill the
                # whole session while the unreaped keeper still reserves its id
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        box_module.remove_cgroups(self.cgroups)
        self.cgroups = {}
        if self.output is not None:
            self.output.close()
        for fd in [self.verdict_fd] + ([self.channel.read_fd, self.channel.write_fd] if self.channel else []):
            if fd is not None:
                os.close(fd)
        self.channel = self.verdict_fd = None
        if self.dir is not None:
            remove_tree(self.dir)
            self.dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_json_data(data):
    """A reply's value (box.encode's tagged form) as the JSON data it would compare equal to: tuples
    become lists, dict keys strings (as json.dumps writes them), like the expected values that come
    from JSONL. TypeError for what JSON cannot hold (sets, bytes, handles), ValueError if malformed.

    Built without ever hashing a value the box chose: a set or an int-keyed dict of numbers that all
    hash alike costs O(n^2) to build, and the box can send 500k of them in one reply. Sets are refused
    unbuilt, and dict keys become strings, whose hash is salted per process. So the cost is linear in
    the reply, which the channel caps, whatever the values."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [to_json_data(v) for v in data]
    if type(data) is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag == "t" and type(body) is list:
            return [to_json_data(v) for v in body]
        if tag == "d" and type(body) is list and all(type(kv) is list and len(kv) == 2 for kv in body):
            return {_json_key(k): to_json_data(v) for k, v in body}
        if tag in ("s", "f", "b", "h"):
            raise TypeError(f"a reply of kind {tag!r} is not JSON data")
    raise ValueError(f"malformed value {str(data)[:80]}")


def _json_key(key):
    if type(key) is str:
        return key
    if key is None or type(key) in (bool, int, float):
        return json.dumps(key)  # 1 -> "1", True -> "true", None -> "null", as a JSON object key
    raise TypeError("a dict key JSON cannot hold")


def run_function_tests(source, entry_point, tests, limits=Limits()):
    """How many of `tests` ([args, expected] pairs) `entry_point(*args) == expected` passes, the
    function being defined by `source` and run in a box. Stops at the first failure."""
    with Box("serve", {"solution.py": source}, limits) as b:
        b.wait_boot()
        passed = 0
        try:
            b.channel.send({"op": "getattr", "obj": {"m": "solution"}, "name": entry_point})
            fn = _ok(b.channel.recv())
            if not (type(fn) is dict and type(fn.get("h")) is int):  # a function stays in the box
                return 0
            for args, expected in tests:
                b.channel.send({"op": "call", "obj": fn, "args": encode(list(args)), "kwargs": {"d": []}})
                if to_json_data(_ok(b.channel.recv())) != expected:
                    break
                passed += 1
        except (EOFError, ValueError, TypeError, Timeout, RecursionError):
            pass  # the box died, raised, lied about the format or ran out of time: the rest fail
        return passed


def _ok(reply):
    """The value of a reply; ValueError if the call raised (or the reply is not a reply)."""
    if type(reply) is not dict or "ok" not in reply:
        raise ValueError(f"no result: {str(reply)[:200]}")
    return reply["ok"]


def run_module_tests(files, test_source, limits=Limits()):
    """Run the test_* functions of `test_source` against the modules in `files` ({path: source}):
    the modules are served by one box, the tests run in another (see the docstring at the top).
    Returns (passed, total, failures), or None when no verdict came (crash or timeout)."""
    modules = set()
    for path in files:
        if path.endswith(".py"):
            parts = path[:-3].split("/")
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # pkg and pkg.util
    a_r, a_w = os.pipe()  # tests -> serve
    b_r, b_w = os.pipe()  # serve -> tests
    try:
        with Box("serve", files, limits, peer_fds=(a_r, b_w)), \
                Box("tests", {"tests.py": test_source}, limits, peer_fds=(b_r, a_w), verdict=True,
                    extra={"modules": sorted(modules), "test_file": "tests.py"}) as tests_box:
            for fd in (a_r, a_w, b_r, b_w):
                os.close(fd)
            a_r = a_w = b_r = b_w = None
            verdict = _read_verdict(tests_box.verdict_fd, time.monotonic() + limits.wall_s)
    finally:
        for fd in (a_r, a_w, b_r, b_w):
            if fd is not None:
                os.close(fd)
    if verdict is None:
        return None
    return verdict["passed"], verdict["total"], verdict["failures"]


def _read_verdict(fd, deadline):
    """The tests box's one-line verdict, or None if it does not come before the deadline."""
    channel = _Channel(fd, fd, deadline, max_bytes=1 << 20)
    try:
        return channel.recv()
    except (EOFError, ValueError, Timeout):
        return None
