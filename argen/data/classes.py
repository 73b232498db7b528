"""Fashion-MNIST class names and the user's ways of naming them (ids, names, synonyms).

Pure Python: the command line resolves `--class` with it before importing torch, so a wrong
class is refused at once.
"""

from __future__ import annotations

import functools
import numbers
import re
from typing import Sequence

from argen.data import captions
from argen.errors import ArgenError

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Extra spellings accepted by resolve_class beyond class names and caption synonyms.
_EXTRA_ALIASES: dict[int, tuple[str, ...]] = {
    0: ("tshirt", "t shirt", "tee shirt"),
    1: ("trouser", "trousers", "pants", "slacks", "jeans"),
    5: ("flip-flop",),
    9: ("ankle-boot",),
}


def _normalise(name: str) -> str:
    """Compare names ignoring case, spaces and punctuation ("T-shirt/top" == "tshirttop")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.lru_cache(maxsize=1)
def _alias_table() -> dict[str, int]:
    """Map every normalised spelling (class names, synonyms, extra aliases) to its id."""
    table: dict[str, int] = {}
    for label, name in enumerate(CLASS_NAMES):
        spellings = [name, *name.split("/")]
        spellings += captions.TRAIN_SYNONYMS[label] + captions.HELDOUT_SYNONYMS[label]
        spellings += _EXTRA_ALIASES.get(label, ())
        for spelling in spellings:
            keys = [_normalise(spelling)]
            if spelling.startswith("pair of "):
                keys.append(_normalise(spelling[len("pair of "):]))
            for key in keys:
                if table.setdefault(key, label) != label:
                    raise RuntimeError(f"alias {spelling!r} names two classes")  # a bug here, not user input
    return table


def _unknown_class(value) -> ArgenError:
    names = ", ".join(f"{i}={n}" for i, n in enumerate(CLASS_NAMES))
    return ArgenError(f"unknown Fashion-MNIST class {value!r}; use an id or name ({names}) or a synonym such as 'sneaker' or 'boot'")


def resolve_class(name_or_id: str | int) -> int:
    """Turn a user's class spec (id, numeric string, name or synonym) into a label id.

    Plurals ("sneakers", "dresses") are accepted by dropping a trailing "s"/"es" when the
    word itself is unknown.
    """
    if isinstance(name_or_id, numbers.Integral) and not isinstance(name_or_id, bool):
        label = int(name_or_id)
    elif isinstance(name_or_id, str) and name_or_id.strip().lstrip("+-").isdigit():
        label = int(name_or_id.strip())
    elif isinstance(name_or_id, str):
        table = _alias_table()
        key = _normalise(name_or_id)
        candidates = [key, key[:-1] if key.endswith("s") else "", key[:-2] if key.endswith("es") else ""]
        label = next((table[k] for k in candidates if k in table), None)
        if label is None:
            raise _unknown_class(name_or_id)
    else:
        raise _unknown_class(name_or_id)
    if not 0 <= label < len(CLASS_NAMES):
        raise _unknown_class(name_or_id)
    return label


def _norm_name(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_model_class(value, class_names: Sequence[str], num_classes: int) -> int:
    """A class id or name of a model with `class_names` (possibly empty) -> id, with a one-line
    error listing valid names. Fashion-MNIST models also take synonyms ("sneaker", "boot")."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise ArgenError(f"a class label is an integer id or a name, got {value!r}")
    if isinstance(value, str) and value.strip().lstrip("+-").isdecimal():
        value = int(value.strip())
    if isinstance(value, numbers.Integral):
        if not 0 <= int(value) < num_classes:
            raise ArgenError(f"class id {value} out of range: valid ids are 0..{num_classes - 1}")
        return int(value)
    if tuple(class_names) == CLASS_NAMES:
        return resolve_class(value)
    wanted = _norm_name(value)
    for i, name in enumerate(class_names):
        if _norm_name(name) == wanted:
            return i
    names = ", ".join(f"{i}={n}" for i, n in enumerate(class_names)) or f"ids 0..{num_classes - 1}"
    raise ArgenError(f"unknown class {value!r}; valid classes: {names}")
