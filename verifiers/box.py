"""The inside of the code sandbox: what runs in the child process. Read verifiers/sandbox.py first.

Started by the parent as `python -I -S box.py CONFIG_JSON` with an empty environment, stdin closed
and stdout/stderr going to a size-capped unnamed file. It imports only the standard library (-I -S:
no site-packages, no current directory on the path), so nothing of ours or of the venv reaches the
model's code. It first asks the kernel for SIGTERM when the scorer dies (PR_SET_PDEATHSIG), however
it dies. As root it then builds the box, in this order, each step before any model code:

1. unshare(NEWNS | NEWIPC | NEWNET | NEWPID): private mounts, private SysV IPC (shared memory,
   queues, semaphores die with the box), a network with nothing but a down loopback, and a process
   namespace; then fork, inside the cgroups the parent made for this box (memory, pids, cpuacct:
   limits on all of its processes together). The forked child is PID 1 of the namespace; when it
   dies the kernel kills and reaps everything the model started in there, setsid() or not. This
   process stays outside as the *keeper*: it kills PID 1 when the box's CPU time (all processes)
   passes cpu_s, or on SIGTERM (from the parent, or from the kernel when the parent dies); then it
   reaps it and exits, so the parent knows the box is empty the moment the keeper is reaped.
2. The child dies with the keeper (PR_SET_PDEATHSIG). A new root: one tmpfs of file_mb MB, mounted
   over /tmp in the private mount namespace, holding /work (the box's files, read from a memfd),
   /tmp, and read-only binds of the standard library and the shared libraries, then chroot into
   it. The model sees no repository, no data files, no /proc, no /root, no binaries to exec; all it
   writes is in that tmpfs and dies with it.
3. rlimits (CPU seconds, address space, file size, processes, open files, no core files), a
   seccomp filter without the keyring system calls (keyrings are per uid, not per namespace), then
   setgroups([]), setgid, setuid to an unprivileged id: root ignores RLIMIT_NPROC and file
   permissions, nobody does not.
Without namespaces (not root, or not permitted: sandbox.namespaces_available) the box degrades to
the rlimits, the seccomp filter, a process group and a work directory in the host's /tmp, running as
the calling user, or as 65534 under root (say so if you rely on it: a setsid() child can then outlive
the box, and every limit binds each process, not the box); as root, the interpreter's standard
library must then be readable by that uid, or the parent raises SandboxError. Where cgroup v1
controllers are not mounted at /sys/fs/cgroup or not writable, memory, processes and CPU are
bounded per process only.

Roles, after the box is built:
- "serve": load nothing yet; answer requests read from a pipe, one JSON line each: getattr of a
  module ({"m": name}, imported from /work on first use) or of a handle, or a call. Results go back
  tagged-encoded (`encode`): plain data is copied *by value*, anything else stays here and travels
  as a numbered handle. This is the only process that runs model code.
- "tests": run a test file against proxy modules whose attributes and calls are requests to a
  "serve" box. No model code ever runs here, so the assertions cannot be tampered with; the verdict
  goes to its own pipe, which the serving box does not hold.
"""
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
import types

# ----------------------------------------------------------------------------------------------
# the wire format: tagged JSON, one value per message

_CONTAINERS = {tuple: "t", set: "s", frozenset: "f"}
_FROM_TAG = {"t": tuple, "s": set, "f": frozenset}


def encode(value, handle=None):
    """Python value -> JSON-able tagged form. Only exact builtin types count as data (a subclass of
    int with a lying __eq__ is *not* an int); everything else goes through `handle(value)`, or is an
    error when there is none."""
    t = type(value)
    if value is None or t in (bool, int, float, str):
        return value
    if t is list:
        return [encode(v, handle) for v in value]
    if t in _CONTAINERS:
        return {_CONTAINERS[t]: [encode(v, handle) for v in value]}
    if t is dict:
        return {"d": [[encode(k, handle), encode(v, handle)] for k, v in value.items()]}
    if t is bytes:
        return {"b": value.hex()}
    if handle is None:
        raise TypeError(f"cannot send a {t.__name__}")
    return {"h": handle(value)}


def decode(data, handle):
    """Tagged form -> a fresh Python value built by this (trusted) side; `handle(id)` makes handles.
    Anything malformed raises ValueError."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v, handle) for v in data]
    if type(data) is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag in _FROM_TAG and type(body) is list:
            return _FROM_TAG[tag](decode(v, handle) for v in body)
        if tag == "d" and type(body) is list and all(type(kv) is list and len(kv) == 2 for kv in body):
            return {decode(k, handle): decode(v, handle) for k, v in body}
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "h" and type(body) is int:
            return handle(body)
    raise ValueError(f"malformed value {str(data)[:80]}")


class Pipe:
    """Newline-delimited JSON over a pair of file descriptors."""

    def __init__(self, read_fd, write_fd):
        self.reader = os.fdopen(read_fd, "rb", buffering=1 << 16)
        self.write_fd = write_fd

    def send(self, message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data):]

    def recv(self, max_bytes=1 << 24):
        line = self.reader.readline(max_bytes)
        if not line.endswith(b"\n"):
            raise EOFError("the other side closed the pipe (or sent an oversized message)")
        return json.loads(line)


# ----------------------------------------------------------------------------------------------
# role "serve": the only place model code runs

def serve(pipe):
    import importlib
    sys.path.insert(0, os.getcwd())
    objects = []  # handle id -> object; the peer only ever sees the ids

    def keep(obj):
        objects.append(obj)
        return len(objects) - 1

    pipe.send({"boot": "ok"})  # everything up to here ran without model code
    while True:
        request = pipe.recv()
        try:
            ref = request["obj"]
            target = importlib.import_module(ref["m"]) if "m" in ref else objects[ref["h"]]
            if request["op"] == "getattr":
                value = getattr(target, request["name"])
            else:
                args = decode(request["args"], objects.__getitem__)
                kwargs = decode(request["kwargs"], objects.__getitem__)
                value = target(*args, **kwargs)
            reply = {"ok": encode(value, keep)}
        except BaseException as e:  # model code may raise anything, SystemExit included
            reply = {"raise": type(e).__name__, "msg": str(e)[:300]}
        pipe.send(reply)


# ----------------------------------------------------------------------------------------------
# role "tests": trusted test code against proxies of the served modules

class RemoteError(Exception):
    """An exception raised on the serving side whose type is not a builtin exception."""


def run_tests(pipe, modules, test_file, verdict_fd):
    import builtins

    if pipe.recv() != {"boot": "ok"}:
        raise RuntimeError("the serving box did not start")

    def request(**message):
        pipe.send(message)
        reply = pipe.recv()
        if "raise" in reply:
            cls = getattr(builtins, str(reply["raise"]), None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = RemoteError
            raise cls(f"{reply['raise']}: {reply['msg']}")
        value = decode(reply["ok"], lambda i: Remote({"h": i}))
        return value

    class Remote:
        """An object that lives in the serving box; attribute reads and calls are requests."""

        def __init__(self, ref):
            object.__setattr__(self, "_ref", ref)

        def __getattr__(self, name):
            return request(op="getattr", obj=self._ref, name=name)

        def __call__(self, *args, **kwargs):
            send = lambda v: encode(v, lambda r: r._ref["h"] if isinstance(r, Remote) else _refuse(r))
            return request(op="call", obj=self._ref, args=send(list(args)), kwargs=send(kwargs))

        # len() and [] are calls of the remote method; Python itself insists that len() gets a
        # plain int, and an item comes back as plain data or another handle
        def __len__(self):
            return self.__getattr__("__len__")()

        def __getitem__(self, key):
            return self.__getattr__("__getitem__")(key)

        # but no truth value and no `in`: both would be the model's object answering for the test
        # (a returned object whose __len__ says 1 would pass `assert is_even(3)`). A test compares
        # plain values: `assert is_even(3) is True`, `assert 3 in stack.items`.
        def __bool__(self):
            raise TypeError("an object of the module under test has no truth value here: compare a plain value")

        def __contains__(self, item):
            raise TypeError("`in` on an object of the module under test: test a plain value instead")

    def _refuse(value):
        raise TypeError(f"cannot pass a {type(value).__name__} to the module under test")

    for name in modules:  # `import module` / `from module import f` find these proxies
        proxy = types.ModuleType(name)
        proxy.__getattr__ = Remote({"m": name}).__getattr__  # PEP 562 module __getattr__
        sys.modules[name] = proxy

    namespace = {"__name__": "tests"}
    with open(test_file) as f:
        exec(compile(f.read(), test_file, "exec"), namespace)
    # only functions the test file itself defines: a name imported from the module is not a test
    tests = [(n, fn) for n, fn in namespace.items()
             if n.startswith("test_") and isinstance(fn, types.FunctionType) and fn.__module__ == "tests"]
    failures = []
    for name, fn in tests:
        try:
            fn()
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    verdict = {"passed": len(tests) - len(failures), "total": len(tests), "failures": failures}
    os.write(verdict_fd, (json.dumps(verdict) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# building the box

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 22, 38
libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


# what the interpreter may still need to read: the shared libraries of extension modules (zlib,
# sqlite3, ssl, ...) and the loader's cache; all read-only, none of it secret
SYSTEM_PATHS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache")
NEW_ROOT = "/tmp"  # where the box's tmpfs is mounted, in its own mount namespace only


def _bind_read_only(source, target):
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_new_root(file_mb, uid, gid):
    """chroot into one tmpfs of file_mb MB holding /work, /tmp, the standard library and the
    system's shared libraries (read-only). The tmpfs is everything the box can write, all of its
    processes together; it is mounted over /tmp in the box's private mount namespace, so the host
    never sees it, and it is gone when the namespace's last process is, however deep or odd the
    tree the model left in it."""
    root = NEW_ROOT
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    system = SYSTEM_PATHS + tuple(p for p in sys.path if p and os.path.isdir(p))
    hidden = [p for p in system if p == root or p.startswith(root + "/")]
    if hidden:
        raise SystemExit(f"box: {hidden[0]} is needed inside the box but {root} is where its tmpfs goes")
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={file_mb}m,nr_inodes=16384,mode=755")
    bound = []
    for path in system:
        if any(path == b or path.startswith(b + "/") for b in bound) or not os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        if os.path.islink(path):  # /lib -> usr/lib on merged-/usr systems: the same link inside
            os.symlink(os.readlink(path), root + path)
            continue
        if os.path.isdir(path):
            os.mkdir(root + path)
        else:
            open(root + path, "w").close()
        _bind_read_only(path, root + path)
        bound.append(path)
    os.mkdir(root + "/tmp", 0o1777)
    os.chmod(root + "/tmp", 0o1777)
    os.mkdir(root + "/work", 0o700)
    os.chown(root + "/work", uid, gid)
    os.chroot(root)
    os.chdir("/work")


def write_files(files_fd, uid, gid):
    """The box's files ({relative path: text}, JSON in a memfd from the parent) into the current
    directory, owned by the box's user."""
    with os.fdopen(files_fd, "rb") as f:
        files = json.load(f)
    for path, text in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if not os.path.isdir(d):
                os.mkdir(d, 0o700)
                os.chown(d, uid, gid)
        with open(path, "w", encoding="utf-8", errors="replace") as f:  # lone surrogates
            f.write(text)
        os.chown(path, uid, gid)


# cgroups (v1): the limits of the box as a whole. RLIMITs bind each process, so ten forked processes
# get ten times the memory and CPU; a cgroup counts all of them together. The parent makes them
# (make_cgroups) and moves the keeper in while its interpreter starts: a move between cgroups waits
# for an RCU grace period (~10 ms) and stalls forks meanwhile, which would otherwise add to every
# box. The keeper forks the box inside them and stays: its own few ms of CPU count against cpu_s,
# and the box's processes are the OOM killer's first choice (oom_score_adj 1000), not the keeper.
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PREFIX = "nanocascade-box-"
CGROUP_CONTROLLERS = ("memory", "pids", "cpuacct")


def cgroup_dirs():
    """{controller: the directory of this process's cgroup} for the cgroup v1 hierarchies."""
    with open("/proc/self/cgroup") as f:  # "4:memory:/a/b" -> memory: /sys/fs/cgroup/memory/a/b
        return {c: f"{CGROUP_ROOT}/{cs}{path.rstrip('/')}" for _, cs, path in
                (line.rstrip("\n").split(":", 2) for line in f) for c in cs.split(",") if c}


def make_cgroups(limits, name):
    """A memory, a pids and a cpuacct cgroup named `name` under this process's own: memory (swap
    included) capped at memory_mb, at most nproc processes, CPU time read by the keeper.
    {controller: directory}, or {} where cgroup v1 controllers are not mounted or not writable."""
    made = {}
    try:
        mine = cgroup_dirs()
        for controller in CGROUP_CONTROLLERS:
            _sweep_cgroups(mine[controller])
            made[controller] = f"{mine[controller]}/{name}"
            os.mkdir(made[controller])
        _write(made["memory"] + "/memory.limit_in_bytes", limits["memory_mb"] << 20)
        if os.path.exists(made["memory"] + "/memory.memsw.limit_in_bytes"):  # no swapping out either
            _write(made["memory"] + "/memory.memsw.limit_in_bytes", limits["memory_mb"] << 20)
        _write(made["pids"] + "/pids.max", limits["nproc"])
    except (OSError, KeyError):
        remove_cgroups(made)
        return {}
    return made


def move_to_cgroups(cgroups, pid):
    """Move process `pid` (0: this one) into each of `cgroups` it is not in yet."""
    here = cgroup_dirs() if pid == 0 else {}
    for controller, path in cgroups.items():
        if here.get(controller) != path:
            _write(path + "/cgroup.procs", pid)


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _sweep_cgroups(parent):
    """Remove the cgroups left by a scorer that died (named after its pid) and a keeper that could
    not remove them (SIGKILL): empty ones only, since rmdir refuses the others."""
    for name in os.listdir(parent):
        owner = name[len(CGROUP_PREFIX):].split("-")[0]
        if name.startswith(CGROUP_PREFIX) and owner.isdigit():
            try:
                os.kill(int(owner), 0)
            except ProcessLookupError:
                try:
                    os.rmdir(f"{parent}/{name}")
                except OSError:
                    pass
            except OSError:
                pass


def remove_cgroups(cgroups):
    # a cgroup is removable once its last process is released, a moment after it is reaped
    for path in cgroups.values():
        for _ in range(100):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def cpu_seconds(cgroups):
    with open(cgroups["cpuacct"] + "/cpuacct.usage") as f:
        return int(f.read()) / 1e9


# seccomp: the kernel's keyrings are per uid, not per namespace, so a key one box adds to its user's
# keyring the next box could read. The box gets no keyring system call at all (add_key, request_key,
# keyctl), and no system call of another ABI (i386, x32) that could reach them by other numbers.
SECCOMP_KEYRING_CALLS = {"x86_64": (0xC000003E, (248, 249, 250)), "aarch64": (0xC00000B7, (217, 218, 219))}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def forbid_keyrings():
    """Install the seccomp filter; False on an architecture we have no system call numbers for."""
    if os.uname().machine not in SECCOMP_KEYRING_CALLS:
        return False
    arch, (add_key, request_key, keyctl) = SECCOMP_KEYRING_CALLS[os.uname().machine]
    LOAD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1     # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    program = [(LOAD, 0, 0, 4),                   # seccomp_data.arch
               (JEQ, 0, 6, arch),                 # another ABI: refuse
               (LOAD, 0, 0, 0),                   # seccomp_data.nr
               (JGE, 4, 0, 0x40000000),           # x32 numbers: refuse
               (JEQ, 3, 0, add_key), (JEQ, 2, 0, request_key), (JEQ, 1, 0, keyctl),
               (RET, 0, 0, ALLOW),
               (RET, 0, 0, EPERM)]
    filters = (_SockFilter * len(program))(*[_SockFilter(*op) for op in program])
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(_SockFprog(len(program), filters)), 0, 0), "seccomp")
    return True


def set_limits(limits):
    mb = 1 << 20
    for resource_id, value in [(resource.RLIMIT_CPU, limits["cpu_s"]),
                               (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                               (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
                               (resource.RLIMIT_NPROC, limits["nproc"]),
                               (resource.RLIMIT_NOFILE, limits["nofile"]),
                               (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(resource_id, (value, value))


def keep(child, cgroups, cpu_s):
    """The keeper's wait: until the box's first process is gone, checking every 0.1 s that the box
    as a whole has not used more than cpu_s of CPU (RLIMIT_CPU only bounds each process)."""
    pidfd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll(100):
        if cgroups and cpu_seconds(cgroups) > cpu_s:
            os.kill(child, signal.SIGKILL)  # PID 1 of the box: the kernel kills the rest
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


def main():
    if sys.argv[1] == "probe":  # can this machine build the box? (sandbox.namespaces_available)
        os._exit(0 if libc.unshare(NAMESPACES) == 0 else 1)
    config = json.loads(sys.argv[1])
    # the scorer gone, however it died (SIGKILL included), the keeper gets SIGTERM and stops the box;
    # if it died before this line, we are an orphan already
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != config["parent"]:
        os._exit(1)
    root = os.geteuid() == 0
    namespaces = config["namespaces"]
    if namespaces:
        _check(libc.unshare(NAMESPACES), "unshare")
    cgroups = config["cgroups"]
    move_to_cgroups(cgroups, 0)  # unless the parent has already: the box is forked inside them
    fds = config["fds"]
    child = None

    def stop(signum, frame):  # installed before the fork so that no SIGTERM is ever missed
        if child:
            for kill in (os.kill, os.killpg):  # the group too when there is no PID namespace
                try:
                    kill(child, signal.SIGKILL)
                except OSError:
                    pass
        else:
            os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    child = os.fork()
    if child:  # the keeper: outside the box's namespaces (not its cgroups), never runs model code
        for fd in fds.values():
            os.close(fd)
        code = keep(child, cgroups, config["limits"]["cpu_s"])
        if os.getppid() != config["parent"] and cgroups:  # the scorer is gone: nobody else will
            move_to_cgroups({c: os.path.dirname(p) for c, p in cgroups.items()}, 0)  # step out
            remove_cgroups(cgroups)
        os._exit(code)

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    uid, gid = (config["uid"], config["gid"]) if root else (os.getuid(), os.getgid())
    if namespaces:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # keeper gone -> box gone
        _write("/proc/self/oom_score_adj", 1000)  # any OOM killer picks the box's processes first
        enter_new_root(config["limits"]["file_mb"], uid, gid)
    else:
        os.setpgid(0, 0)
        os.chdir(os.path.join(config["box"], "work"))
    write_files(fds.pop("files"), uid, gid)
    pipe = Pipe(fds["read"], fds["write"])
    set_limits(config["limits"])
    forbid_keyrings()
    if root:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.umask(0o077)
    if config["role"] == "serve":
        serve(pipe)
    else:
        run_tests(pipe, config["modules"], config["test_file"], fds["verdict"])
    os._exit(0)


if __name__ == "__main__":
    main()
