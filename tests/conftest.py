"""Test setup. Without a GPU the Triton kernels run under Triton's interpreter, which must be
switched on before triton is first imported. Only the kernel tests (and tests marked `triton`) also
set NANOCASCADE_TRITON=1, which makes kernels/ pick the Triton path for CPU tensors: everywhere else
the model runs its plain-torch path, which is what a CPU user gets (and much faster than the
interpreter)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("NANOCASCADE_TRITON", None)
# One intra-op thread: the test models are tiny, and a second thread only spin-waits (on a loaded
# 2-core machine that made a tiny forward 20x slower). Parallelism comes from separate processes.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (under the interpreter on a CPU)")
    # (pytest-timeout's, where installed: bench/gpu.sh gives each test 150 s unless it says more)
    config.addinivalue_line("markers", "timeout(seconds): this test's limit under pytest-timeout")


@pytest.fixture(autouse=True)
def _triton_for_kernel_tests(request):
    # not through `monkeypatch`: a test that calls monkeypatch.undo() would undo this too
    on = request.node.get_closest_marker("triton") or request.module.__name__.endswith("test_kernels")
    if on:
        os.environ["NANOCASCADE_TRITON"] = "1"
    yield
    if on:
        del os.environ["NANOCASCADE_TRITON"]


@pytest.fixture(autouse=True)
def _no_tf32_leak():
    # the stages switch TF32 on for their CUDA matmuls (sft.py, grpo.py) and run in-process in some
    # tests; the fp32 kernel tests after them on a GPU compare at fp32 tolerances, not TF32's
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(scope="session")
def transformers_python():
    """run(code, cwd) -> stdout of `code` run by this Python in a fresh process that can import
    transformers: cwd is `cwd` and PYTHONPATH is cleared, so the project is not on its path. (From the
    project's root, our kernels/ would shadow Hugging Face's `kernels` package, which transformers
    >= 5.2x imports.) Skips the test where transformers is not installed."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}

    def run(code, cwd):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=600)
        if out.returncode:
            raise AssertionError(f"the transformers subprocess failed:\n{out.stderr[-3000:]}")
        return out.stdout

    probe = subprocess.run([sys.executable, "-c", "import transformers"], cwd="/", env=env, capture_output=True)
    if probe.returncode:
        pytest.skip("transformers is not installed")
    return run
