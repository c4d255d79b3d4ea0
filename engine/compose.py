"""Composed configs: a config dataclass made of smaller ones (``part`` fields) whose settings are read, set,
passed to the constructor and turned into command-line flags by their flat names: ``PPOConfig(clip_low=0.3)``
builds its loss part with it, ``cfg.clip_low`` reads ``cfg.loss.clip_low``, ``--clip-low`` sets it. Each setting
has one home (the part that defines and validates it); the flat names are only how it is reached.

Torch-free on purpose: ``fusedrl train --help`` builds its parser from here without importing torch; a part whose
module imports torch (the kernels' loss config) is read from its source text for the flags.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string literal right after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):  # fmt: skip
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def part(factory, *, rename: dict[str, str] | None = None, owned: tuple[str, ...] = (),
         choices: dict[str, tuple] | None = None, source: str | None = None):  # fmt: skip
    """A field holding a smaller config (``factory()`` builds its default). Its fields are reachable by flat names
    on the outer config (``cfg.clip_low`` is ``cfg.loss.clip_low``; ``PPOConfig(clip_low=0.3)`` builds the part
    with it) and become flat flags. ``rename``: part field -> flat name; ``owned``: part fields the outer config
    sets itself (not exposed); ``choices``: help-text choices of string fields; ``source``: ``"module:Class"`` of a
    part whose module imports torch (its fields are then read from its source for ``--help``)."""
    meta = {"part": True, "rename": dict(rename or {}), "owned": tuple(owned), "choices": dict(choices or {}),
            "source": source}  # fmt: skip
    return dataclasses.field(default_factory=factory, metadata=meta)


def _parts(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("part")]


@dataclass(frozen=True)
class FlatField:
    """One flat setting of a (composed) config: its flag name, type, default, docstring and where it lives."""

    name: str
    type: object
    default: object
    doc: str
    part: str | None = None
    """The part field holding it (None: the config's own field)."""
    inner: str | None = None
    """Its name inside the part."""


def flat_fields(cls) -> list[FlatField]:
    """Every flat setting of ``cls``: its own fields, then each part's (renamed, owned ones left out). Torch-free:
    a part given by ``source`` is read from its module's source text."""
    out = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("part"):
            out.append(FlatField(f.name, hints[f.name], f.default, docs.get(f.name, "")))
            continue
        meta = f.metadata
        for name, tp, default, doc in _part_fields(f):
            if name in meta["owned"]:
                continue
            if name in meta["choices"]:
                tp = Literal[meta["choices"][name]]
            out.append(FlatField(meta["rename"].get(name, name), tp, default, doc, f.name, name))
    return out


def _hints(cls) -> dict:
    """Resolved field types, parts (whose types may need torch) left as their annotation strings."""
    parts = {f.name for f in _parts(cls)} if dataclasses.is_dataclass(cls) else set()
    module = sys.modules[cls.__module__].__dict__
    out = {}
    for klass in reversed(cls.__mro__):
        for name, ann in klass.__dict__.get("__annotations__", {}).items():
            out[name] = ann if name in parts else (eval(ann, module) if isinstance(ann, str) else ann)
    return out


def _part_fields(f: dataclasses.Field) -> list[tuple[str, object, object, str]]:
    """(name, type, default, docstring) of a part's fields."""
    source = f.metadata["source"]
    if source is None or source.split(":")[0] in sys.modules:
        default = f.default_factory()
        cls, hints, docs = type(default), None, None
        hints, docs = _hints(cls), field_docs(cls)
        return [
            (g.name, hints[g.name], getattr(default, g.name), docs.get(g.name, "")) for g in dataclasses.fields(cls)
        ]
    return _source_fields(*source.split(":"))


def _source_fields(package: str, class_name: str) -> list[tuple[str, object, object, str]]:
    """A dataclass's fields read from the source of ``package`` (a fusedrl subpackage) without importing it:
    ``fusedrl train --help`` must not import torch. Types and defaults may name builtins, ``Literal`` and the mode
    names of ``fusedrl.names``; a type it cannot read is taken as ``str`` (the class validates the value anyway)."""
    import fusedrl
    import fusedrl.names

    names = {**vars(fusedrl.names), "Literal": Literal}
    sub = package.split(".")[-1]
    dirs = fusedrl._with_sources([str(Path(fusedrl.__file__).parent / sub)], sub)
    pattern = re.compile(rf"^class {class_name}\b", re.M)
    for d in dirs:
        for path in sorted(Path(d).glob("*.py")):
            text = path.read_text()
            if not pattern.search(text):
                continue
            node = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == class_name)
            out = []
            for a, b in itertools.zip_longest(node.body, node.body[1:]):
                if not (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)):
                    continue
                doc = b.value.value if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) else ""
                try:
                    tp = eval(ast.unparse(a.annotation), dict(names))  # float | None, Literal[POLICY_LOSSES], ...
                except Exception:  # noqa: BLE001 - a type only the real class can resolve
                    tp = str
                out.append((a.target.id, tp, eval(ast.unparse(a.value), dict(names)), " ".join(str(doc).split())))
            return out
    raise ImportError(f"cannot find class {class_name} in the sources of {package}")


def composed(cls):
    """Class decorator (after ``@dataclass``) for a config with ``part`` fields: flat names in the constructor,
    for reading and for setting. A frozen part is replaced by a copy (validated again) when one of its fields is
    set. Unknown names raise TypeError as a dataclass does."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def flat_map(klass) -> dict[str, tuple[str, str]]:
        cached = klass.__dict__.get("_flat_map")
        if cached is None:
            cached = {x.name: (x.part, x.inner) for x in flat_fields(klass) if x.part is not None}
            klass._flat_map = cached
        return cached

    def __init__(self, *args, **kwargs):
        routed: dict[str, dict] = {}
        for name in [k for k in kwargs if k not in names]:
            where = flat_map(type(self)).get(name)
            if where is None:
                raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {name!r}")
            routed.setdefault(where[0], {})[where[1]] = kwargs.pop(name)
        for part_name, values in routed.items():
            base = kwargs.get(part_name)
            if base is None:
                base = next(f for f in dataclasses.fields(self) if f.name == part_name).default_factory()
            kwargs[part_name] = dataclasses.replace(base, **values)
        init(self, *args, **kwargs)

    def __getattr__(self, name):
        where = None if name.startswith("__") else flat_map(type(self)).get(name)
        if where is None or where[0] not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[where[0]], where[1])

    def __setattr__(self, name, value):
        if cls.__dataclass_params__.frozen:  # its __init__ sets fields with object.__setattr__, never through here
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        where = None if name in names else flat_map(type(self)).get(name)
        if where is None:
            object.__setattr__(self, name, value)
            return
        held = self.__dict__[where[0]]
        if type(held).__dataclass_params__.frozen:
            object.__setattr__(self, where[0], dataclasses.replace(held, **{where[1]: value}))
        else:
            setattr(held, where[1], value)

    cls.__init__, cls.__getattr__, cls.__setattr__ = __init__, __getattr__, __setattr__
    __init__.__signature__ = inspect.signature(init)
    return cls


def flat_dict(cfg) -> dict:
    """A (composed) config's settings by flat name, as ``config.yaml`` and checkpoints store them."""
    return {x.name: getattr(cfg, x.name) for x in flat_fields(type(cfg))}
