"""Build script: installs the top-level source folders kernels/ and engine/ as fusedrl.kernels and fusedrl.engine
and builds the pybind11 extensions. Static metadata lives in pyproject.toml.

kernels/ and engine/ hold no __init__.py, so that from the repository root they are never top-level packages
`kernels` / `engine` (transformers imports Hugging Face's `kernels`). The packages' __init__ files are in
fusedrl/kernels/ and fusedrl/engine/: a wheel gets the folders' modules copied beside them (build_py below); an
editable install and a plain checkout find them through the __path__ those __init__ files extend.
"""

from glob import glob
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE_FOLDERS = {"fusedrl.kernels": "kernels", "fusedrl.engine": "engine"}


class build_py_with_sources(build_py):
    """build_py that also copies each subpackage's modules from its top-level source folder."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        folder = SOURCE_FOLDERS.get(package)
        if folder is not None:
            modules += [(package, Path(f).stem, f) for f in sorted(glob(f"{folder}/*.py"))]
        return modules


ext_modules = [
    Pybind11Extension(
        "fusedrl.engine._rollout",
        sorted(glob("csrc/*.cpp")),
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    # Native CPU loops of the log-prob ops' row softmax. Optional: where it does not compile (it needs GCC or
    # Clang vector extensions) the install goes on and kernels/_rows.py runs the same math in torch ops.
    Pybind11Extension(
        "fusedrl.kernels._cpu_rows",
        ["csrc/cpu_rows/rows.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3", "-Wno-psabi"],
        optional=True,
    ),
]

setup(
    packages=["fusedrl", "fusedrl.integrations", *SOURCE_FOLDERS],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext, "build_py": build_py_with_sources},
    zip_safe=False,
)
