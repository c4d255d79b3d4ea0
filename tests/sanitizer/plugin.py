"""pytest plugin (``-p plugin`` with tests/sanitizer on PYTHONPATH): import the sanitizer build of
fusedrl.engine._rollout under its real name before anything imports fusedrl.engine.packing, so the
ordinary tests exercise the instrumented code. FUSEDRL_SANITIZED_EXT names the .so (tests/sanitizer/build.py)."""

import importlib.machinery
import importlib.util
import os
import sys

_path = os.environ["FUSEDRL_SANITIZED_EXT"]
_name = "fusedrl.engine._rollout"
assert _name not in sys.modules, "the normal extension was imported before the sanitizer plugin"
_spec = importlib.util.spec_from_loader(_name, importlib.machinery.ExtensionFileLoader(_name, _path), origin=_path)
_module = importlib.util.module_from_spec(_spec)
sys.modules[_name] = _module
_spec.loader.exec_module(_module)


def pytest_report_header(config):
    import fusedrl.engine.packing as packing

    assert packing._rollout.__file__ == _path, (packing._rollout.__file__, _path)
    return f"fusedrl.engine._rollout: sanitizer build {_path}"
