"""fusedrl: a kernel-optimised RLHF engine for PyTorch.

- ``fusedrl.kernels``: fused Triton ops (log-probs, PPO loss, KL, entropy, value loss, GAE) with
  plain PyTorch references beside them.
- ``fusedrl.engine``: packed rollouts, padding-free attention and the PPO/GRPO/RLOO/REINFORCE++ trainer.

Layout: the modules of ``fusedrl.kernels`` and ``fusedrl.engine`` live in the repository's top-level ``kernels/`` and
``engine/`` folders, which hold no ``__init__.py``: from the repository root (the current directory of ``python -m``,
a script that puts the root on ``sys.path``) they are never packages named ``kernels`` / ``engine``, so
``import kernels`` there finds Hugging Face's package, which transformers imports. The two package ``__init__`` files
are ``fusedrl/kernels/__init__.py`` and ``fusedrl/engine/__init__.py``; in a source checkout they add their folder to
the package's ``__path__``, in an installed wheel the modules sit beside them (setup.py copies them there).
"""

from pathlib import Path

__version__ = "0.1.0"


def _with_sources(path: list[str], folder: str) -> list[str]:
    """A subpackage's ``__path__`` plus the repository's top-level ``folder`` when running from a source checkout."""
    here = Path(path[0])
    root = here.parents[1]
    source = root / folder
    # An installed wheel's parent directory is site-packages, where `kernels` is Hugging Face's package: only a
    # fusedrl checkout (setup.py beside the folder, which itself is no package) contributes its folder.
    if (root / "setup.py").is_file() and source.is_dir() and not (source / "__init__.py").exists():
        return [*path, str(source)]
    return list(path)
