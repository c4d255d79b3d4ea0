"""Build the C++ extensions (fusedrl.engine._rollout, fusedrl.kernels._cpu_rows) with AddressSanitizer +
UndefinedBehaviorSanitizer into their own directory.

    python tests/sanitizer/build.py [OUT_DIR]       # default build/sanitize; prints the .so path

The normal in-place builds (fusedrl/engine/_rollout*.so, fusedrl/kernels/_cpu_rows*.so) are never touched:
tests/sanitizer/plugin.py loads these copies under the modules' real names. -fno-sanitize-recover makes every
UB report fatal, like an ASan report, so a report can only end a test run with a failure, never scroll by.
-D_GLIBCXX_ASSERTIONS adds bounds checks to std::vector::operator[] and friends.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pybind11

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [
    "-std=c++17", "-O1", "-g", "-fPIC", "-fno-omit-frame-pointer", "-fvisibility=hidden",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-D_GLIBCXX_ASSERTIONS",
]  # fmt: skip


def build(out_dir: Path) -> Path:
    cxx = os.environ.get("CXX", "g++")
    includes = ["-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"]]
    sources = sorted((ROOT / "csrc").glob("*.cpp"))
    obj_dir = out_dir / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / ("_rollout" + sysconfig.get_config_var("EXT_SUFFIX"))

    def compile_one(src: Path) -> Path:
        obj = obj_dir / (src.stem + ".o")
        if not obj.exists() or obj.stat().st_mtime < max(
            src.stat().st_mtime, (ROOT / "csrc/rollout.h").stat().st_mtime
        ):
            cmd = [cxx, *FLAGS, *includes, "-c", str(src), "-o", str(obj)]
            print(shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        return obj

    rows_src = ROOT / "csrc/cpu_rows/rows.cpp"
    with ThreadPoolExecutor(2) as pool:  # the CI machine has 2 cores
        objs = list(pool.map(compile_one, [*sources, rows_src]))
    rows_obj = objs.pop()
    link = [cxx, "-shared", "-fsanitize=address,undefined"]
    subprocess.run([*link, *map(str, objs), "-o", str(so)], check=True)
    rows_so = out_dir / ("_cpu_rows" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([*link, str(rows_obj), "-o", str(rows_so)], check=True)
    return so


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "sanitize"))
