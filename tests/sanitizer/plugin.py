"""pytest plugin (``-p plugin`` with tests/sanitizer on PYTHONPATH): import the sanitizer builds of
fusedrl.engine._rollout and fusedrl.kernels._cpu_rows under their real names before anything imports fusedrl, so
the ordinary tests exercise the instrumented code. FUSEDRL_SANITIZED_EXT names the _rollout .so
(tests/sanitizer/build.py); the _cpu_rows one lies beside it."""

import importlib.machinery
import importlib.util
import os
import sys
import sysconfig

_path = os.environ["FUSEDRL_SANITIZED_EXT"]
_rows_path = os.path.join(os.path.dirname(_path), "_cpu_rows" + sysconfig.get_config_var("EXT_SUFFIX"))


def _load(name, path):
    assert name not in sys.modules, f"the normal {name} was imported before the sanitizer plugin"
    spec = importlib.util.spec_from_loader(name, importlib.machinery.ExtensionFileLoader(name, path), origin=path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_load("fusedrl.engine._rollout", _path)
_load("fusedrl.kernels._cpu_rows", _rows_path)


def pytest_report_header(config):
    import fusedrl.engine.packing as packing
    from fusedrl.kernels import _rows

    assert packing._rollout.__file__ == _path, (packing._rollout.__file__, _path)
    assert _rows._native.__file__ == _rows_path, (_rows._native.__file__, _rows_path)
    return f"fusedrl.engine._rollout, fusedrl.kernels._cpu_rows: sanitizer builds {_path}, {_rows_path}"
