"""Build script: maps the top-level source folders into the single `fusedrl` namespace and builds the
pybind11 rollout extension. Static metadata lives in pyproject.toml."""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

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
    # kernels/ and engine/ are installed as fusedrl.kernels and fusedrl.engine, never as top-level
    # `kernels`/`engine` (transformers probes for a package named `kernels`).
    packages=["fusedrl", "fusedrl.integrations", "fusedrl.kernels", "fusedrl.engine"],
    package_dir={
        "fusedrl": "fusedrl",
        "fusedrl.integrations": "fusedrl/integrations",
        "fusedrl.kernels": "kernels",
        "fusedrl.engine": "engine",
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
