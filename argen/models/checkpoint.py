"""Reading weights safely.

Official LlamaGen `.pt` files are pickles holding more than tensors (an `argparse.Namespace` of
training args, optimizer state). `torch.load(weights_only=False)` would run arbitrary code from
such a file, so it is never used. Instead the file is read with torch's weights-only unpickler,
and every global it does not allow is replaced by an inert placeholder class: nothing named in
the pickle is ever called, the tensors come out intact, and the rest is ignored.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError

# Keys that official files are known to carry but that are not weights.
STRAY_KEY_PATTERNS = (
    r"(^|\.)freqs_cis$",
    r"(^|\.)causal_mask$",
    r"\.kv_cache\.[kv]_cache$",
)


class _InertObject:
    """Stands in for any non-allowlisted global in a pickle. Accepts anything, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _torch_load_inert(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # noqa: BLE001 - any failure here means "try the inert route"
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a torch zip/pickle file at all
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(first_error).__name__})") from None
        if not unsafe:
            raise CheckpointError(f"{path}: unreadable checkpoint: {str(first_error).splitlines()[0]}") from None
        stand_ins = [(_InertObject, name) for name in unsafe]
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - torch refuses some modules (os, subprocess...) outright
            raise CheckpointError(
                f"{path}: refusing to load: the pickle calls {', '.join(unsafe)}, which could run code"
            ) from None


def _extract_state_dict(obj, path: str, prefer_ema: bool) -> dict:
    if isinstance(obj, Mapping):
        order = ("ema", "model") if prefer_ema else ("model", "ema")
        for key in order + ("module", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return _extract_state_dict(obj[key], path, prefer_ema)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
    raise CheckpointError(
        f"{path}: no state dict found (expected a dict of tensors, or one under 'model', 'ema', 'module' or 'state_dict')"
    )


def load_state_dict_file(path: str, prefer_ema: bool = False) -> dict:
    """Load a state dict from `.safetensors` or a torch pickle (`.pt`, `.pth`, `.bin`), safely."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    return _extract_state_dict(_torch_load_inert(path), path, prefer_ema)


def _strip_prefix(state_dict: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _short_list(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_into(module: torch.nn.Module, state_dict: Mapping, source: str = "state dict",
              ignore: Optional[Iterable[str]] = None) -> None:
    """Copy `state_dict` into `module`, strictly, with one clear error listing what does not fit.

    Known stray keys (RoPE tables, KV-cache buffers) are dropped first; `ignore` adds patterns.
    """
    patterns = [re.compile(p) for p in STRAY_KEY_PATTERNS + tuple(ignore or ())]
    state_dict = {k: v for k, v in _strip_prefix(dict(state_dict)).items() if not any(p.search(k) for p in patterns)}
    own = module.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                   for k in set(own) & set(state_dict) if tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch (checkpoint vs model): {_short_list(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def load_checkpoint_into(module: torch.nn.Module, checkpoint, prefer_ema: bool = False) -> torch.nn.Module:
    """`checkpoint` is a state dict or a path to one (see `load_state_dict_file`); strict, with clear errors."""
    if isinstance(checkpoint, Mapping):
        load_into(module, checkpoint, source="state dict")
    else:
        load_into(module, load_state_dict_file(checkpoint, prefer_ema=prefer_ema), source=str(checkpoint))
    return module
