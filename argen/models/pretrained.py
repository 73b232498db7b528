"""`save_pretrained` / `from_pretrained` in the diffusers layout: `config.json` + `model.safetensors`.

Configs go through diffusers' `ConfigMixin` (`save_config` / `load_config`). Weights are written
with safetensors under the name `model.safetensors`; folders written by diffusers' own
`ModelMixin.save_pretrained` (`diffusion_pytorch_model.safetensors`) load too. Writes are atomic:
a folder is assembled beside the target and renamed into place, so an interrupted save never
leaves a half-written model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..atomic import atomic_directory_write
from ..errors import CheckpointError
from ..hub import resolve_model_dir
from .checkpoint import load_into, load_state_dict_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_NAMES = (WEIGHTS_NAME, "diffusion_pytorch_model.safetensors")


class PretrainedMixin:
    """For modules that are also diffusers `ConfigMixin`s whose config rebuilds them: `cls(**config)`."""

    def save_pretrained(self, save_directory, dtype: Optional[torch.dtype] = None, extra_files: Optional[dict] = None):
        """Write config.json + model.safetensors (optionally cast floats to `dtype`, e.g. float16)."""
        state = {}
        for key, value in self.state_dict().items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[key] = value.detach().contiguous().cpu()

        def write(tmp: Path):
            self.save_config(tmp)
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)

        atomic_directory_write(Path(save_directory), write, kind="model")

    @classmethod
    def config_to_init_kwargs(cls, config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype: Optional[torch.dtype] = None):
        """Load a model saved by `save_pretrained` (or a shipped model name such as 'default-c2i')."""
        folder = resolve_model_dir(name_or_path)
        if not (folder / cls.config_name).is_file():
            raise CheckpointError(f"{folder}: no {cls.config_name} (not a model folder written by save_pretrained)")
        config_path = folder / cls.config_name
        try:
            config = cls.load_config(folder)
        except (OSError, ValueError) as err:  # diffusers reports a corrupt JSON file as an EnvironmentError
            raise CheckpointError(f"{str(config_path)!r} is not a valid config ({str(err).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{str(config_path)!r} must hold a JSON object")
        expected = cls.__name__
        if config.get("_class_name", expected) != expected:
            raise CheckpointError(f"{folder} holds a {config['_class_name']}, not a {expected}")
        try:
            model = cls(**cls.config_to_init_kwargs(config))
        except (TypeError, ValueError, KeyError, ArithmeticError, RuntimeError) as err:  # a field of the wrong type or value
            raise CheckpointError(f"{str(config_path)!r} does not describe a {expected}: "
                                  f"{(str(err).splitlines() or [type(err).__name__])[0]}") from None
        weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder}: no weights file ({' or '.join(WEIGHTS_NAMES)})")
        load_into(model, load_state_dict_file(weights), source=str(weights))
        model.eval()
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even with nothing to keep in fp32
        if dtype is not None:
            torch.nn.Module.to(model, dtype)
        if device is not None:
            torch.nn.Module.to(model, device)
        return model
