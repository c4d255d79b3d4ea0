"""The layering of kernels/: the building blocks and the loss configs sit below the op files (never importing one),
and the README's module map names every file of the folder."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
OPS = {"logprobs", "ppo_loss", "linear_ppo_loss", "linear_preference_loss", "value_loss", "gae"}
LOWER = ("_utils", "configs", "_rows", "_policy")


def _relative_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            # from .mod import x -> mod; from . import mod -> mod
            names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return names


def test_lower_layers_import_no_op_file():
    for name in LOWER:
        used = _relative_imports(KERNELS / f"{name}.py")
        assert not used & OPS, f"kernels/{name}.py imports the op modules {sorted(used & OPS)}"
        # Each lower layer imports only those listed before it.
        assert used <= set(LOWER[: LOWER.index(name)]) | {"_cpu_rows"}, (name, sorted(used))


def test_readme_module_map_names_every_kernels_file():
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `fusedrl.kernels`"))
    missing = [p.name for p in sorted(KERNELS.glob("*.py")) if f"`{p.name}`" not in row]
    assert not missing, f"the README's fusedrl.kernels row does not name {missing}"
