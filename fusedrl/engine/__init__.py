"""fusedrl.engine: rollout -> pack -> score -> advantages -> update.

The modules are in the repository's top-level engine/ folder (see fusedrl/__init__.py for why it is not a package
itself)."""

from fusedrl import _with_sources

__path__ = _with_sources(__path__, "engine")
