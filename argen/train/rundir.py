"""The run folder of `argen train` (`--out`): checked before any work, claimed before the first write.

Light on purpose (no torch): the command line calls `check_run_dir` before importing the
training code, so a wrong `--out` is refused in a fraction of a second.

A run folder is argen's when it carries the marker of `argen.atomic.claim_dir` (kind
"train-run"). Anything else that is not empty is the user's, and training there would append to
their `log.csv` and replace their `model/` folder: it is refused. Folders of runs started before
the marker existed are adopted when everything in them is a name a run writes and their
`train_config.json` is argen's; their `model/` (if any) must be argen's too.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Optional

from ..atomic import MARKER, SIGNATURE, _check_parent, _version, atomic_write_json, claim_dir, folder_marker, is_argen_folder
from ..errors import ArgenError

KIND = "train-run"
_RUN_NAMES = {"checkpoints", "log.csv", "train_config.json", "metrics.json", "model", "codes_train.safetensors"}
_STATE_KEYS = ("step", "elapsed", "ema_updates", "num_processes", "train_config", "rng")


def _legacy_run(out: Path) -> bool:
    """A run folder written before run folders carried a marker (see the module docstring)."""
    try:
        config = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(config, dict) and {"train", "run", "num_processes"} <= set(config)):
        return False
    names = {p.name for p in out.iterdir()}
    if not names <= _RUN_NAMES | {MARKER}:
        return False
    return not (out / "model").exists() or is_argen_folder(out / "model")


def checkpoints(out) -> list:
    """`(step, folder)` of the checkpoints under `out/checkpoints` that have a state.json, oldest first."""
    root = Path(out) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file():
                try:
                    found.append((int(p.name[len("step_"):]), p))
                except ValueError:
                    continue
    return sorted(found)


def read_state(ckpt) -> dict:
    """A checkpoint's state.json, or a one-line error when it is unreadable or incomplete."""
    path = Path(ckpt) / "state.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArgenError(f"checkpoint {ckpt} is corrupt ({path.name}: {type(exc).__name__}); "
                         "delete that folder to resume from the previous checkpoint") from None
    missing = [k for k in _STATE_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(meta.get("train_config"), dict) or not isinstance(meta.get("rng"), list):
        raise ArgenError(f"checkpoint {ckpt} is corrupt ({path.name} lacks {', '.join(missing) or 'valid fields'}); "
                         "delete that folder to resume from the previous checkpoint")
    return meta


def check_run_dir(out, resume: bool, flag: str = "--out") -> Path:
    """Everything about `--out` that can be checked before any work, without writing anything."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ArgenError(f"{flag} {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (
            is_argen_folder(out, KIND) or (folder_marker(out) is None and _legacy_run(out))):
        raise ArgenError(f"{flag} {str(out)!r} holds files that are not an argen training run; "
                         "choose a new or empty folder")
    _check_parent(out / "x" if out.is_dir() else out, flag)
    found = checkpoints(out)
    if found and not resume:
        raise ArgenError(f"{flag} {str(out)!r} already holds checkpoints (latest {found[-1][1].name}): pass --resume to "
                         "continue that run, or choose another --out")
    if resume and not found:
        if not out.is_dir() or not any(out.iterdir()):
            raise ArgenError(f"--resume: nothing to resume in {str(out)!r} (no training run there); "
                             "check the path, or drop --resume to start a new run")
    if resume and found:
        read_state(found[-1][1])
    return out


def claim_run_dir(out, resume: bool, main_process: bool = True) -> Path:
    """`check_run_dir`, then mark the folder as argen's (main process only) before the first write.

    A run folder argen made whose run never reached a checkpoint has nothing to resume: it
    starts at step 0 with a notice on stderr."""
    out = check_run_dir(out, resume)
    if main_process:
        if folder_marker(out) is None and out.is_dir() and any(out.iterdir()):  # adopted run of an older argen
            atomic_write_json(out / MARKER, {SIGNATURE: _version(), "kind": KIND})
        claim_dir(out, KIND)
        if resume and not checkpoints(out):
            print(f"argen: --resume: {out} holds no checkpoint yet; starting at step 0", file=sys.stderr)
    return out


def check_codes_cache(path, flag: str = "--codes-cache") -> Optional[Path]:
    """A user-named codes cache must be a .safetensors file argen wrote (its header carries the
    cache key) or not exist yet: anything else at that path is the user's and is not overwritten."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ArgenError(f"{flag} must end in .safetensors, got {str(path)!r}")
    if path.is_dir():
        raise ArgenError(f"{flag} {str(path)!r} is a folder; give a file name")
    if path.exists():
        try:
            with open(path, "rb") as handle:
                size = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(min(size, 1 << 20)))
            meta = header.get("__metadata__") or {}
            ours = {"vq", "items", "flip", "limit"} <= set(meta)
        except (OSError, ValueError, struct.error, AttributeError):
            ours = False
        if not ours:
            raise ArgenError(f"{flag} {str(path)!r} exists and is not a codes cache argen wrote; "
                             "move it away or choose another name")
    _check_parent(path, flag)
    return path


def list_in_marker(folder, names) -> None:
    """Add files argen wrote into an exported model folder after `save_pretrained` (sample grid,
    metrics, model card) to its marker, so a later export (a resumed, finished run) may replace it."""
    marker = folder_marker(folder)
    if marker is None or marker.get("files") is None:
        return
    marker["files"] = sorted(set(marker["files"]) | {n for n in names if (Path(folder) / n).exists()})
    atomic_write_json(Path(folder) / MARKER, marker)
