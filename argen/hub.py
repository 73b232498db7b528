"""Where models live: shipped names (`default-c2i`, ...) or directories written by `save_pretrained`.

Nothing is ever downloaded: a name resolves to a folder inside the installed package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ArgenError

ASSETS = Path(__file__).resolve().parent / "assets"

# name -> folder under argen/assets
SHIPPED_MODELS = {
    "default-vq": "default-vq",
    "default-c2i": "default-c2i",
    "default-t2i": "default-t2i",
    # coarse-to-fine (issue 14): the coarse generator's pipeline names its refiner by name
    "ctf-c2i": "ctf-c2i",
    "ctf-refiner": "ctf-refiner",
    "shuffle-c2i": "shuffle-c2i",
    "fmnist-classifier": "fmnist-classifier",
    "titok-fmnist-k16": "titok-fmnist-k16",  # TiTok, 16 1D tokens (issue 15)
    "titok-c2i": "titok-c2i",  # class-conditional GPT on titok-fmnist-k16 codes (issue 15)
    "default-flextok": "default-flextok",  # FlexTok, 1..32 ordered 1D tokens, flow decoder (issue 16)
    "flextok-c2i": "flextok-c2i",  # class-conditional GPT on default-flextok codes (issue 16)
    # draft models for the `draft` sampler (issue 17), named by the pipelines' "drafter" entries
    "default-c2i-drafter": "default-c2i-drafter",
    "default-t2i-drafter": "default-t2i-drafter",
}


def resolve_model_dir(name_or_path) -> Path:
    """Turn a shipped model name or a directory into an existing directory, or fail in one line."""
    text = os.fspath(name_or_path)
    if not text.strip():  # Path("") is the working directory: never load whatever happens to be there
        raise ArgenError("empty model name: give a shipped model name or a folder")
    if text in SHIPPED_MODELS:
        path = ASSETS / SHIPPED_MODELS[text]
        if not path.is_dir():
            raise ArgenError(f"shipped model {text!r} is missing from this install (expected {path})")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    names = ", ".join(SHIPPED_MODELS)
    raise ArgenError(f"no model directory {text!r} (give a folder written by save_pretrained, or one of: {names})")


PIPELINE_FILE = "pipeline.json"
CONFIG_FILE = "config.json"


def read_json_object(path, what: str = "") -> dict:
    """A JSON file holding an object, or a one-line error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ArgenError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ArgenError(f"{str(path)!r} is not valid JSON ({str(err).splitlines()[0]}); "
                         f"restore it or re-save the model") from None
    if not isinstance(data, dict):
        raise ArgenError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclass
class ModelFolder:
    """What a pipeline folder says about itself, read from its JSON files only (no torch)."""

    folder: Path
    gpt_dir: Path  # the generator's folder
    config: dict  # the generator's config.json
    meta: dict  # pipeline.json ({} when absent)

    @property
    def is_text_to_image(self) -> bool:
        """A pipeline with a text encoder is text-conditional (any generator class)."""
        return "text_encoder" in self.meta or self.config.get("model_type") == "t2i"

    @property
    def class_names(self) -> list:
        return list(self.meta.get("class_names") or [])


def inspect_model_dir(name_or_path) -> ModelFolder:
    """Resolve a model and read its config.json and pipeline.json, with one-line errors for a
    folder that is not a model, or whose JSON files are corrupt."""
    folder = resolve_model_dir(name_or_path)
    meta = read_json_object(folder / PIPELINE_FILE) if (folder / PIPELINE_FILE).is_file() else {}
    generator = meta.get("generator")
    if generator is not None and not isinstance(generator, str):
        raise ArgenError(f"{str(folder / PIPELINE_FILE)!r}: generator must be a folder, got {generator!r}")
    # "gpt": folders saved by ARPipeline before the generator entry existed
    gpt_dir = folder / (generator or ("gpt" if (folder / "gpt" / CONFIG_FILE).is_file() else "."))
    if not (gpt_dir / CONFIG_FILE).is_file():
        raise ArgenError(f"{str(folder)!r} is not a model folder: it has no {CONFIG_FILE} (give a folder "
                         f"written by save_pretrained or by argen train, or one of: {', '.join(SHIPPED_MODELS)})")
    config = read_json_object(gpt_dir / CONFIG_FILE)
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ArgenError(f"{str(folder / PIPELINE_FILE)!r}: class_names must be a list of names")
    for key in ("tokenizer", "drafter"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise ArgenError(f"{str(folder / PIPELINE_FILE)!r}: {key} must be a name or a folder, got {value!r}")
    return ModelFolder(folder, gpt_dir, config, meta)
