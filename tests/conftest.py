"""Test configuration.

- Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is set here,
  before anything imports triton. With CUDA the kernels compile for the GPU (the interpreter is global to the
  process), so tests that would run a Triton kernel on CPU tensors are skipped there: those parametrised with
  backend="triton" before they start, any other the moment it launches a kernel on CPU tensors
  (``InterpreterUnavailable``); run `TRITON_INTERPRET=1 pytest tests` as a second pass to cover them too on a GPU
  machine. tests/test_kernels_on_cuda_box.py checks this with the interpreter switched off.
- Tests taking the `device` fixture run on CPU and, when present, on CUDA with the same tolerances.
- `@pytest.mark.torch_ops` (helpers.TORCH_OPS): backend="torch" with the native CPU loops switched off.
- One intra-op thread per test process: tiny ops on a shared 2-core machine are 10-50x slower with more.
- Every test runs in its own scratch directory as the current directory: none may depend on being started in the
  repository root (paths into the checkout are built from the test file's location).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not INTERPRET else [])
INTERPRETER_OFF = "Triton on CPU tensors needs TRITON_INTERPRET=1 (a separate pass on CUDA machines)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    from fusedrl.kernels._utils import InterpreterUnavailable

    try:
        return (yield)
    except InterpreterUnavailable:
        if INTERPRET:
            raise
        pytest.skip(INTERPRETER_OFF)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _cwd_outside_the_repository(tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") == "triton" and not INTERPRET and str(params.get("device", "cpu")) == "cpu":
        pytest.skip(INTERPRETER_OFF)
    torch.manual_seed(1234)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = None
    if request.node.get_closest_marker("torch_ops"):
        from fusedrl.kernels import _rows as rows

        native, rows.native_cpu = rows.native_cpu, False
    yield
    if rows is not None:
        rows.native_cpu = native
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    """The character tokenizer most engine tests use (a test module may define its own ``tok``)."""
    from fusedrl.engine.tokenizer import build_char_tokenizer

    return build_char_tokenizer()
