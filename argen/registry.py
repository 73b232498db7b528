"""Components found by class name, the diffusers way, without importing anything named in a file.

A component folder's `config.json` names its class (`_class_name`, written by diffusers'
`ConfigMixin.save_config`). Loading looks that name up here; a name that is not registered is a
one-line error. argen's own generators, tokenizers and refiners register themselves when their
modules are imported (`BUILTIN_MODULES`, a fixed list, imported on first lookup); users register
theirs from Python:

    from argen.registry import register

    @register
    class MyTokenizer(PretrainedMixin, ModelMixin, ConfigMixin, ImageTokenizer): ...
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Dict, Optional

from .errors import ArgenError, CheckpointError

_CLASSES: Dict[str, type] = {}
# Imported on the first lookup so their classes register; fixed here, never read from a file.
BUILTIN_MODULES = ("argen.models", "argen.tokenizers", "argen.refiners")


def register(cls: type) -> type:
    """Class decorator: make `cls` loadable by its name from a component folder."""
    name = cls.__name__
    taken = _CLASSES.get(name)
    if taken is not None and taken is not cls and taken.__module__.startswith("argen."):
        raise ArgenError(f"{name!r} is the name of argen's {taken.__module__}.{name}; give your class another name")
    _CLASSES[name] = cls
    return cls


def registered() -> Dict[str, type]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(_CLASSES)


def lookup(name: str, kind: Optional[type] = None) -> type:
    """The registered class called `name` (a subclass of `kind` if given), or a one-line error."""
    classes = registered()
    cls = classes.get(name)
    if cls is None:
        known = ", ".join(sorted(c for c in classes if kind is None or issubclass(classes[c], kind)))
        raise CheckpointError(f"unknown component class {name!r} (registered: {known}); "
                              f"register it with argen.registry.register before loading")
    if kind is not None and not issubclass(cls, kind):
        raise CheckpointError(f"{name} is not a {kind.__name__}")
    return cls


def class_name_of(folder) -> str:
    """The `_class_name` recorded in a component folder's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a component folder written by save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable or corrupt JSON ({exc})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise CheckpointError(f"{path} names no component class (_class_name)")
    return name


def load_component(folder, kind: Optional[type] = None, device=None):
    """Load a component folder with the class its config.json names."""
    cls = lookup(class_name_of(folder), kind)
    return cls.from_pretrained(folder, device=device)
