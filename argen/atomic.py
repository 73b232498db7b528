"""Writing outputs without ever losing a user's files.

Three rules, for every file and folder argen writes:

* **Atomic**: an output is assembled in a temporary sibling and renamed into place, so a killed
  run never leaves a half-written file. Temporaries carry the writer's pid; the next writer in
  the same folder removes those whose process is gone.
* **Only argen's own outputs are replaced.** A folder argen wrote holds a marker file
  (`MARKER`) listing what argen put in it; a file argen wrote carries a signature in its own
  format (a PNG text chunk, a JSON key, a Markdown comment). Anything else at an output path is
  the user's: `check_output_file` / `check_output_dir` refuse it with a one-line error before
  any work starts, and the writers refuse it again at write time.
* **The user's umask**: `tempfile` creates 0600 files and 0700 folders; outputs are chmod-ed to
  what `open()` / `mkdir()` would have made.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

from .errors import ArgenError

MARKER = ".argen-output.json"  # in every folder argen writes: {"argen": version, "kind": ..., "files": [...]}
SIGNATURE = "argen"  # PNG text chunk / JSON key holding the argen version that wrote the file
_MD_SIGNATURE = "<!-- written by argen"
_TMP_TAG = ".argen-tmp-"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def _version() -> str:
    from . import __version__

    return __version__


# ---- who wrote this? -----------------------------------------------------------------------


def folder_marker(folder) -> Optional[dict]:
    """The marker of a folder argen wrote, or None."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and SIGNATURE in data else None


def is_argen_folder(folder, kind: Optional[str] = None) -> bool:
    """True when `folder` carries argen's marker (of `kind`, if given) and holds nothing argen
    did not list in it, so replacing it loses none of the user's files."""
    marker = folder_marker(folder)
    if marker is None or (kind is not None and marker.get("kind") != kind):
        return False
    listed = marker.get("files")
    if listed is None:  # a run folder (training, evaluation): it grows, its content is argen's
        return True
    present = {p.name for p in Path(folder).iterdir()} - {MARKER}
    return present <= set(listed)


def is_argen_file(path) -> bool:
    """True when the file at `path` carries argen's signature in its own format."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return SIGNATURE in getattr(image, "text", {})
        if suffix == ".json":
            data = json.loads(path.read_text())
            return isinstance(data, dict) and SIGNATURE in data
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return handle.readline().startswith(_MD_SIGNATURE)
    except Exception:  # unreadable or corrupt: not provably ours
        return False


def sign_json(data: dict) -> dict:
    """`data` with argen's signature first, for JSON outputs a user names on the command line."""
    return {SIGNATURE: _version(), **{k: v for k, v in data.items() if k != SIGNATURE}}


def sign_text(text: str) -> str:
    """Markdown/text with argen's signature as the first line (an HTML comment: invisible when rendered)."""
    return f"{_MD_SIGNATURE} {_version()} -->\n{text}"


# ---- checks made before any work -----------------------------------------------------------


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor must be a writable folder (missing folders are created)."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ArgenError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgenError(f"{flag} {str(path)!r}: folder {str(parent)!r} is not writable")


def check_output_file(path, suffixes: Iterable[str] = (), flag: str = "output") -> Path:
    """Validate a file output before the work: right suffix, not a folder, a writable place,
    and if it exists, written by argen (else refuse: it is the user's)."""
    path = Path(path).expanduser()
    suffixes = tuple(s.lower() for s in suffixes)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ArgenError(f"{flag} must end in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise ArgenError(f"{flag} {str(path)!r} is a folder; give a file name")
    if path.exists() and not is_argen_file(path):
        raise ArgenError(f"{flag} {str(path)!r} exists and was not written by argen; "
                         f"move it away or choose another name")
    _check_parent(path, flag)
    return path


def check_output_dir(path, kind: Optional[str] = None, flag: str = "output folder") -> Path:
    """Validate a folder output before the work: absent, empty, or argen's own (of `kind`)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ArgenError(f"{flag} {str(path)!r} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not is_argen_folder(path, kind):
        what = f"an argen {kind} folder" if kind else "by argen"
        raise ArgenError(f"{flag} {str(path)!r} holds files not written {what}; "
                         f"choose a new or empty folder")
    _check_parent(path, flag)
    return path


def claim_dir(path, kind: str) -> Path:
    """Create (or keep) a growing run folder and mark it as argen's. Refuses a user's folder."""
    path = check_output_dir(path, kind)
    path.mkdir(parents=True, exist_ok=True)
    if folder_marker(path) is None:
        atomic_write_json(path / MARKER, {SIGNATURE: _version(), "kind": kind})
    return path


# ---- writers -------------------------------------------------------------------------------


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Remove temporaries left by killed writers of `name` (their pid is no longer running)."""
    for tmp in parent.glob(f".{name}{_TMP_TAG}*"):
        try:
            pid = int(tmp.name[len(name) + 1 + len(_TMP_TAG):].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _temp_prefix(name: str) -> str:
    return f".{name}{_TMP_TAG}{os.getpid()}-"


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Create `path` by calling write(binary file handle); missing parent folders are created."""
    path = Path(path)
    if path.is_dir():
        raise ArgenError(f"cannot write file {str(path)!r}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path, data, indent: int = 2, default=None) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")


def atomic_directory_write(target, write: Callable[[Path], None], kind: str = "folder") -> Path:
    """Call write(tmp_dir), mark tmp_dir as argen's, then move it to `target`.

    An existing `target` is replaced only if argen wrote it (marker present, nothing foreign
    inside); otherwise this refuses before writing anything. The old folder is removed only
    after the new one is in place."""
    target = Path(target)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or is_argen_folder(target))):
        raise ArgenError(f"{str(target)!r} exists and holds files not written by argen; "
                         f"move it away or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), dir=target.parent))
    try:
        write(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({SIGNATURE: _version(), "kind": kind, "files": files}) + "\n")
        # Writers inside (safetensors among them) may create 0600 files; outputs get the user's umask.
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)
        if target.exists():
            old = target.parent / f"{_temp_prefix(target.name)}old"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
