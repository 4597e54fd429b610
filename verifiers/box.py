"""The inside of the code sandbox: what runs in the child process. Read verifiers/sandbox.py first.

Started by the parent as `python -I -S box.py CONFIG_JSON` with an empty environment, stdin closed
and stdout/stderr going to a size-capped file. It imports only the standard library (-I -S: no
site-packages, no current directory on the path), so nothing of ours or of the venv reaches the
model's code. As root it then builds the box, in this order, each step before any model code:

1. unshare(NEWNS | NEWNET | NEWPID): private mounts, a network with nothing but a down loopback,
   and a process namespace, then fork. The forked child is PID 1 of that namespace; when it dies the
   kernel kills and reaps everything the model started in there, setsid() or not. This process stays
   outside as the *keeper*: on SIGTERM from the parent it kills PID 1, waits, and exits, so the parent
   knows the box is empty the moment the keeper is reaped.
2. A new root: a small tmpfs holding /work (the box directory, bind-mounted read-write), /tmp, and
   read-only binds of the standard library and the shared libraries, then chroot into it. The model
   sees no repository, no data files, no /proc, no /root, no binaries to exec, and whatever it
   writes outside /work dies with the tmpfs.
3. rlimits (CPU seconds, address space, file size, processes, open files, no core files), then
   setgroups([]), setgid, setuid to an unprivileged id: root ignores RLIMIT_NPROC and file
   permissions, nobody does not.
Without root the box degrades to rlimits and a process group in the work directory, running as the
calling user (say so if you rely on it: a setsid() child can then outlive the box). As root where
namespaces are not permitted, it keeps the uid drop and the rlimits; the interpreter's standard
library must then be readable by uid 65534, or the parent raises SandboxError.

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
import signal
import sys
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

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


# what the interpreter may still need to read: the shared libraries of extension modules (zlib,
# sqlite3, ssl, ...) and the loader's cache; all read-only, none of it secret
SYSTEM_PATHS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache")


def _bind_read_only(source, target):
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_new_root(box):
    """chroot into a tmpfs that holds only /work, /tmp, the standard library and the system's
    shared libraries (read-only)."""
    root = os.path.join(box, "root")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=755")
    os.mkdir(root + "/work")
    _mount(os.path.join(box, "work"), root + "/work", None, MS_BIND)
    bound = []
    for path in SYSTEM_PATHS + tuple(p for p in sys.path if p and os.path.isdir(p)):
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
    os.mkdir(root + "/tmp")
    os.chmod(root + "/tmp", 0o1777)
    os.chroot(root)
    os.chdir("/work")


def set_limits(limits):
    mb = 1 << 20
    for resource_id, value in [(resource.RLIMIT_CPU, limits["cpu_s"]),
                               (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                               (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
                               (resource.RLIMIT_NPROC, limits["nproc"]),
                               (resource.RLIMIT_NOFILE, limits["nofile"]),
                               (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(resource_id, (value, value))


def main():
    config = json.loads(sys.argv[1])
    root = os.geteuid() == 0
    namespaces = root and libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) == 0
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
    if child:  # the keeper: outside the box, never runs model code
        for fd in fds.values():
            os.close(fd)
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if namespaces:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # keeper gone -> box gone
        enter_new_root(config["box"])
    else:
        os.setpgid(0, 0)
        os.chdir(os.path.join(config["box"], "work"))
    pipe = Pipe(fds["read"], fds["write"])
    set_limits(config["limits"])
    if root:
        os.setgroups([])
        os.setresgid(config["gid"], config["gid"], config["gid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])
    os.umask(0o077)
    if config["role"] == "serve":
        serve(pipe)
    else:
        run_tests(pipe, config["modules"], config["test_file"], fds["verdict"])
    os._exit(0)


if __name__ == "__main__":
    main()
