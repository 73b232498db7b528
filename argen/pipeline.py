"""Text/class -> images, in the diffusers style: `ARPipeline.from_pretrained(...)(prompt=...)`.

A pipeline is a generator (GPT), an image tokenizer, optionally a text encoder, and the class
names. On disk it is either

* a generator folder (`config.json` + `model.safetensors`) with a `pipeline.json` beside the
  weights naming its tokenizer (a shipped name such as "default-vq" or a folder relative to it),
  the class names and, for text-to-image, the text encoder config — the layout of the shipped
  models; or
* a folder written by `ARPipeline.save_pretrained`: `pipeline.json` + `gpt/` + `tokenizer/`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from .errors import ArgenError
from .hub import resolve_model_dir
from .models import GPT
from .models.pretrained import atomic_directory_write
from .samplers import Sampler, SamplingParams, get_sampler
from .tokenizers import VQTokenizer

PIPELINE_FILE = "pipeline.json"

#: A prompt whose sentence embedding is less similar than this (cosine) to every class
#: description names nothing the model knows. Set between the lowest garment prompt of the
#: development prompts (0.53; held-out 0.52) and non-garment prompts such as "a red sports
#: car" (0.38); see docs/benchmarks.md.
KNOWN_PROMPT_SIMILARITY = 0.5


@dataclass
class PromptReading:
    """How a text-to-image pipeline reads a prompt: the nearest class by text-encoder similarity."""

    label: int
    class_name: str
    similarity: float
    known: bool


@dataclass
class ARPipelineOutput(BaseOutput):
    """images: PIL images, in order (all images of prompt/class 0 first). tokens: [N, num_tokens].
    labels: the class id behind each image (c2i, or the prompt index for t2i)."""

    images: List[Image.Image]
    tokens: torch.Tensor
    labels: List[int]
    seeds: List[int]
    num_forward_passes: int
    seconds: float


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats [B, C, H, W] -> uint8 [B, H, W, C], with LlamaGen's conversion
    (clamp(127.5 x + 128)), so saved samples match the official FID scripts bit for bit."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    arrays = to_uint8(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def _class_descriptions(class_names: Sequence[str]) -> tuple:
    """(texts, labels) describing each class: its name, plus for Fashion-MNIST every garment
    name of the training captions (singular, plural, "a photo of a ...")."""
    from .data import captions
    from .data.fashion_mnist import CLASS_NAMES

    texts, labels = [], []
    for label, name in enumerate(class_names):
        names = [name]
        if tuple(class_names) == CLASS_NAMES:
            names += list(captions.TRAIN_SYNONYMS[label])
            for singular, plural in captions.RICH_NOUNS[label]:
                names += [singular, plural, f"a photo of a {singular}"]
        texts += names
        labels += [label] * len(names)
    return texts, labels


def _norm_name(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


class ARPipeline(DiffusionPipeline):
    def __init__(self, gpt: GPT, tokenizer: VQTokenizer, text_encoder=None, class_names: Optional[Sequence[str]] = None,
                 defaults: Optional[dict] = None, crop: Optional[int] = None):
        """`defaults` holds sampling defaults (e.g. {"cfg_scale": 2.0}); `crop` center-crops decoded
        images to that size (a tokenizer trained on padded images, e.g. 28x28 in a 32x32 frame)."""
        super().__init__()
        self.crop = crop
        self.register_modules(gpt=gpt, tokenizer=tokenizer)
        self.text_encoder = text_encoder  # not a torch module of ours: moved by `to()` below
        self.class_names = list(class_names or [])
        self.defaults = dict(defaults or {})
        if gpt.gpt_config.vocab_size != tokenizer.vocab_size:
            raise ArgenError(f"generator vocabulary {gpt.gpt_config.vocab_size} != tokenizer codebook {tokenizer.vocab_size}")
        if gpt.gpt_config.block_size != tokenizer.num_tokens:
            raise ArgenError(f"generator makes {gpt.gpt_config.block_size} tokens, tokenizer takes {tokenizer.num_tokens}")
        if self.is_text_to_image and text_encoder is None:
            raise ArgenError("a text-to-image generator needs a text encoder")

    @property
    def is_text_to_image(self) -> bool:
        return self.gpt.gpt_config.model_type == "t2i"

    def to(self, device):
        self.gpt.to(device)
        self.tokenizer.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_embeddings.weight.device

    # ---- loading / saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", tokenizer=None, text_encoder_path=None):
        """Load a shipped pipeline by name ("default-c2i", "default-t2i") or from a folder.

        `tokenizer` overrides the recorded tokenizer (a name or a folder); `text_encoder_path`
        points a recorded text encoder at a local folder on this machine."""
        folder = resolve_model_dir(name_or_path)
        meta_path = folder / PIPELINE_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        gpt_dir = folder / "gpt" if (folder / "gpt" / "config.json").is_file() else folder
        tok_ref = tokenizer or meta.get("tokenizer")
        if tok_ref is None:
            raise ArgenError(f"{folder}: no tokenizer recorded in {PIPELINE_FILE}; pass tokenizer=<name or folder>")
        tok_dir = folder / tok_ref if (folder / str(tok_ref)).is_dir() else tok_ref
        gpt = GPT.from_pretrained(gpt_dir, device=device)
        vq = VQTokenizer.from_pretrained(tok_dir, device=device)
        encoder = None
        if gpt.gpt_config.model_type == "t2i":
            from .text import text_encoder_from_config

            if "text_encoder" not in meta:
                raise ArgenError(f"{folder}: text-to-image model without a text_encoder entry in {PIPELINE_FILE}")
            encoder = text_encoder_from_config(meta["text_encoder"], device, path=text_encoder_path)
        defaults = dict(meta.get("defaults") or {})
        if "default_cfg_scale" in meta:
            defaults.setdefault("cfg_scale", meta["default_cfg_scale"])
        return cls(gpt, vq, encoder, meta.get("class_names"), defaults, meta.get("crop"))

    def save_pretrained(self, save_directory, dtype: Optional[torch.dtype] = None, **_):
        """Write a self-contained folder: pipeline.json + gpt/ + tokenizer/."""
        meta = {"tokenizer": "tokenizer", "model_type": self.gpt.gpt_config.model_type,
                "class_names": self.class_names, "defaults": self.defaults, "crop": self.crop}
        if self.text_encoder is not None:
            meta["text_encoder"] = self.text_encoder.config()

        def write(tmp: Path):
            self.gpt.save_pretrained(tmp / "gpt", dtype=dtype)
            self.tokenizer.save_pretrained(tmp / "tokenizer", dtype=dtype)
            (tmp / PIPELINE_FILE).write_text(json.dumps(meta, indent=2))

        atomic_directory_write(Path(save_directory), write)

    # ---- inputs ---------------------------------------------------------------------------

    def resolve_class(self, value: Union[int, str]) -> int:
        """A class id or name -> id, with a one-line error listing valid names."""
        num_classes = self.gpt.gpt_config.num_classes
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, (int, np.integer)):
            if not 0 <= int(value) < num_classes:
                raise ArgenError(f"class id {value} out of range: valid ids are 0..{num_classes - 1}")
            return int(value)
        from .data.fashion_mnist import CLASS_NAMES, resolve_class

        if tuple(self.class_names) == CLASS_NAMES:
            return resolve_class(value)  # Fashion-MNIST: synonyms such as "sneaker" or "boot" work
        wanted = _norm_name(value)
        for i, name in enumerate(self.class_names):
            if _norm_name(name) == wanted:
                return i
        names = ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names)) or f"ids 0..{num_classes - 1}"
        raise ArgenError(f"unknown class {value!r}; valid classes: {names}")

    def check_prompts(self, prompts: Sequence[str]) -> None:
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ArgenError("empty prompt: describe the image to generate")
            n = self.text_encoder.count_tokens(prompt)
            if n > self.text_encoder.max_length:
                raise ArgenError(f"prompt too long: {n} tokens, the model reads at most {self.text_encoder.max_length}")

    def read_prompt(self, prompt: str) -> PromptReading:
        """The class `prompt` is closest to, by cosine similarity of sentence embeddings to the
        class descriptions (for Fashion-MNIST: every garment name the training captions use);
        `known` is False when even the closest is below `KNOWN_PROMPT_SIMILARITY`."""
        if not self.is_text_to_image:
            raise ArgenError("read_prompt needs a text-to-image pipeline")
        if getattr(self, "_class_descriptions", None) is None:
            texts, labels = _class_descriptions(self.class_names)
            # Kept on the CPU: the pipeline may move to another device after the first call.
            self._class_descriptions = (self.text_encoder.sentence_embeddings(texts).cpu(), torch.tensor(labels))
        embeddings, labels = self._class_descriptions
        similarity = (self.text_encoder.sentence_embeddings([prompt]).cpu() @ embeddings.T)[0]
        best = int(similarity.argmax())
        label = int(labels[best])
        value = float(similarity[best])
        return PromptReading(label, self.class_names[label], value, value >= KNOWN_PROMPT_SIMILARITY)

    # ---- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: Union[None, str, Sequence[str]] = None,
                 class_labels: Union[None, int, str, Sequence[Union[int, str]]] = None,
                 num_images: int = 1, sampler: Union[str, Sampler] = "ar", cfg_scale: Optional[float] = None,
                 cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 16, progress: bool = True) -> ARPipelineOutput:
        """Generate `num_images` images per prompt (t2i) or per class (c2i).

        Image i (counting over all prompts/classes) is sampled with seed `seed + i`, so it is
        the same whatever `batch_size` is.
        """
        if num_images < 1:
            raise ArgenError(f"num_images must be >= 1, got {num_images}")
        if batch_size < 1:
            raise ArgenError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(sampler, str):
            sampler = get_sampler(sampler)
        params = SamplingParams(cfg_scale=self.defaults.get("cfg_scale", 2.0) if cfg_scale is None else cfg_scale,
                                cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p)
        conds, masks, labels = self.prepare_conditions(prompt, class_labels, num_images)
        seeds = [seed + i for i in range(len(labels))]
        start = time.perf_counter()
        tokens, nfe = [], 0
        batches = range(0, len(labels), batch_size)
        for lo in self.progress_bar(batches) if progress else batches:
            hi = min(lo + batch_size, len(labels))
            out = sampler(self.gpt, conds[lo:hi], params=params, cond_mask=None if masks is None else masks[lo:hi],
                          seeds=seeds[lo:hi])
            tokens.append(out.tokens)
            nfe += out.num_forward_passes
        tokens = torch.cat(tokens)
        images = self.decode(tokens)
        return ARPipelineOutput(images=to_pil(images), tokens=tokens.cpu(), labels=labels, seeds=seeds,
                                num_forward_passes=nfe, seconds=time.perf_counter() - start)

    def decode(self, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        chunks = [self.tokenizer.decode_flat(tokens[i:i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]
        images = torch.cat(chunks).clamp(-1, 1)
        if self.crop and self.crop < images.shape[-1]:
            top = (images.shape[-2] - self.crop) // 2
            left = (images.shape[-1] - self.crop) // 2
            images = images[..., top:top + self.crop, left:left + self.crop]
        return images

    def prepare_conditions(self, prompt=None, class_labels=None, num_images: int = 1):
        """(cond, cond_mask or None, labels) for `num_images` images per prompt or class."""
        if (prompt is None) == (class_labels is None):
            raise ArgenError("give either a prompt (text-to-image) or class labels (class-conditional)")
        if prompt is not None:
            if not self.is_text_to_image:
                raise ArgenError("this is a class-conditional model: pass class labels, not a prompt")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ArgenError("empty prompt list")
            self.check_prompts(prompts)
            feats, mask = self.text_encoder.encode(prompts, device=self.device)
            index = torch.arange(len(prompts)).repeat_interleave(num_images)
            feats = feats.to(self.gpt.dtype)
            return feats[index], mask[index], index.tolist()
        if self.is_text_to_image:
            raise ArgenError("this is a text-to-image model: pass a prompt, not class labels")
        values = [class_labels] if isinstance(class_labels, (int, str, np.integer)) else list(class_labels)
        if not values:
            raise ArgenError("empty class list")
        ids = [self.resolve_class(v) for v in values]
        labels = [i for i in ids for _ in range(num_images)]
        return torch.tensor(labels, device=self.device), None, labels
