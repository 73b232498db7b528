"""Text/class -> images, in the diffusers style: `ARPipeline.from_pretrained(...)(prompt=...)`.

A pipeline is a generator, optionally a refiner, an image tokenizer, optionally a text encoder,
optionally a drafter (a small generator over the same codes, for the `draft` sampler) and the
class names. It holds the one generation path every caller uses (`argen generate`,
`argen eval`, `argen bench`, training sample grids):

    conditions(prompt | class_labels)  -> cond, cond_mask, labels
    sample_tokens(cond, mask, seeds)   -> generator tokens (sampler + generator, in batches)
    tokens_to_images(tokens, ...)      -> images in [-1, 1] (refiner, tokenizer.decode, crop)

On disk a pipeline is a folder with `pipeline.json` (written only by `pipeline_json`)
naming its components: each a folder (relative to pipeline.json; "." is the folder itself,
the layout of the shipped models) or a shipped name such as "default-vq". Components load by the
class their `config.json` names (`argen.registry`), so a new generator, tokenizer or refiner
plugs in without an edit here.
"""

from __future__ import annotations

import hashlib
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from .atomic import atomic_directory_write, atomic_write
from .checks import MAX_SEED, check_device, check_number, check_seed
from .errors import ArgenError
from .hub import PIPELINE_FILE, inspect_model_dir, resolve_model_dir
from .models.base import Generator
from .progress import progress as progress_bar
from .refiners.base import Refiner
from .registry import load_component
from .samplers import Sampler, SamplerOutput, SamplingParams, get_sampler
from .tokenizers.base import ImageTokenizer

#: A prompt whose sentence embedding is less similar than this (cosine) to every class
#: description names nothing the model knows. Set between the lowest garment prompt of the
#: development prompts (0.53; held-out 0.52) and non-garment prompts such as "a red sports
#: car" (0.38); see docs/benchmarks.md.
KNOWN_PROMPT_SIMILARITY = 0.5


#: `decoder_dtype` names: the dtypes a tokenizer may run in when decoding
DECODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class PromptReading:
    """How a text-to-image pipeline reads a prompt: the nearest class by text-encoder similarity."""

    label: int
    class_name: str
    similarity: float
    known: bool


@dataclass
class ARPipelineOutput(BaseOutput):
    """images: PIL images, in order (all images of prompt/class 0 first). tokens: [N, n], the
    generator's tokens. labels: the class id behind each image (or the prompt index)."""

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


def pipeline_json(*, tokenizer: str, class_names: Sequence[str] = (), defaults: Optional[dict] = None,
                  crop: Optional[int] = None, text_encoder: Optional[dict] = None, generator: str = ".",
                  refiner: Optional[str] = None, drafter: Optional[str] = None) -> str:
    """The text of a `pipeline.json`: its one writer (`save_pretrained` and training use it).
    Component entries are folders relative to the file ("." is its own folder) or shipped names.
    `drafter` (optional, written only when given): a small generator over the same codes that
    the `draft` sampler proposes tokens with."""
    meta = {"generator": generator, "refiner": refiner, "tokenizer": tokenizer, "class_names": list(class_names),
            "defaults": dict(defaults or {}), "crop": crop}
    if text_encoder is not None:
        meta["text_encoder"] = dict(text_encoder)
    if drafter is not None:
        meta["drafter"] = drafter
    return json.dumps(meta, indent=1) + "\n"


@dataclass
class Conditions:
    """One condition per image: cond [N] class ids or [N, T, D] features, mask [N, T] or None,
    labels [N] (class id, or prompt index for text)."""

    cond: torch.Tensor
    mask: Optional[torch.Tensor]
    labels: List[int]

    def __getitem__(self, rows: slice) -> "Conditions":
        return Conditions(self.cond[rows], None if self.mask is None else self.mask[rows], self.labels[rows])

    def __len__(self) -> int:
        return len(self.labels)


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


#: The sentence embeddings of a text-to-image pipeline's class descriptions, saved beside its
#: pipeline.json: reading a prompt (`ARPipeline.read_prompt`, behind the note `argen generate` prints)
#: would otherwise embed every description (441 texts for Fashion-MNIST, about 2 s on one of our
#: CPUs) at each start.
CLASS_DESCRIPTIONS_FILE = "class_descriptions.safetensors"


def class_description_embeddings(text_encoder, class_names: Sequence[str]) -> tuple:
    """(unit sentence embeddings [N, D] float32 on the CPU, class ids [N]) of the class descriptions."""
    texts, labels = _class_descriptions(class_names)
    return text_encoder.sentence_embeddings(texts).float().cpu(), torch.tensor(labels)


def _descriptions_key(text_encoder, texts: Sequence[str], labels: Sequence[int]) -> str:
    what = {"texts": list(texts), "labels": list(labels), "encoder": text_encoder.name, "dim": text_encoder.feature_dim}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def save_class_descriptions(folder, text_encoder, class_names: Sequence[str]) -> Path:
    """Write `CLASS_DESCRIPTIONS_FILE` into `folder` (atomically)."""
    embeddings, labels = class_description_embeddings(text_encoder, class_names)
    key = _descriptions_key(text_encoder, *_class_descriptions(class_names))
    data = save_safetensors({"embeddings": embeddings.contiguous(), "labels": labels}, metadata={"key": key})
    return atomic_write(Path(folder) / CLASS_DESCRIPTIONS_FILE, lambda handle: handle.write(data))


def load_class_descriptions(folder, text_encoder, class_names: Sequence[str]) -> Optional[tuple]:
    """The saved embeddings of `folder`, or None when there are none or they are not this encoder's
    embeddings of these descriptions: the key names the texts and the encoder, and the first
    description, embedded again (one short text), must land on its saved row, which catches other
    weights under the same encoder name."""
    path = Path(folder) / CLASS_DESCRIPTIONS_FILE
    if not path.is_file():
        return None
    texts, labels = _class_descriptions(class_names)
    try:
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("key") != _descriptions_key(text_encoder, texts, labels):
                return None
            embeddings, saved_labels = handle.get_tensor("embeddings").float(), handle.get_tensor("labels")
    except (OSError, KeyError, SafetensorError):  # unreadable: computed instead
        return None
    probe = text_encoder.sentence_embeddings(texts[:1]).float().cpu()
    if embeddings.shape != (len(texts), probe.shape[1]) or not torch.equal(saved_labels, torch.tensor(labels)) \
            or not torch.allclose(probe[0], embeddings[0], atol=1e-4):
        return None
    return embeddings, saved_labels


class ARPipeline(DiffusionPipeline):
    def __init__(self, generator: Generator, tokenizer: ImageTokenizer, text_encoder=None,
                 class_names: Optional[Sequence[str]] = None, defaults: Optional[dict] = None,
                 crop: Optional[int] = None, refiner: Optional[Refiner] = None, drafter: Optional[Generator] = None):
        """`defaults` holds sampling defaults (e.g. {"cfg_scale": 2.0}); `crop` center-crops decoded
        images to that size (a tokenizer trained on padded images, e.g. 28x28 in a 32x32 frame);
        `drafter` is handed to samplers that draft with a small model (`prepare(draft=...)`)."""
        super().__init__()
        self.crop = crop
        self.register_modules(generator=generator, tokenizer=tokenizer, refiner=refiner, drafter=drafter)
        for model in (generator, drafter):  # sampling here: prefixes remembered, weights laid out for it
            if model is not None:
                model.prepare_for_sampling()
        self.text_encoder = text_encoder  # not a torch module of ours: moved by `to()` below
        self.class_names = list(class_names or [])
        self.defaults = dict(defaults or {})
        self._check_chain()
        if generator.is_text_conditional and text_encoder is None:
            raise ArgenError("a text-conditional generator needs a text encoder")
        self._prompt_features = {}
        self._folder = None  # the folder it was loaded from: saved class-description embeddings

    def _check_chain(self) -> None:
        """Vocabularies and lengths must agree along generator -> refiner -> tokenizer."""
        gen, ref, tok = self.generator, self.refiner, self.tokenizer
        stages = [(f"generator ({type(gen).__name__})", gen.vocab_size, gen.num_codes)]
        if ref is not None:
            stages.append((f"refiner ({type(ref).__name__}) input", ref.in_vocab_size, ref.num_tokens))
            stages.append((f"refiner ({type(ref).__name__}) output", ref.vocab_size, ref.num_tokens))
        stages.append((f"tokenizer ({type(tok).__name__})", tok.vocab_size, tok.num_tokens))
        pairs = [(stages[0], stages[1])] + ([(stages[2], stages[3])] if ref is not None else [])
        for (a, vocab_a, n_a), (b, vocab_b, n_b) in pairs:
            if vocab_a != vocab_b:
                raise ArgenError(f"{a} has a vocabulary of {vocab_a}, {b} takes {vocab_b}")
            if n_a > n_b:
                raise ArgenError(f"{a} makes {n_a} codes per image, {b} takes at most {n_b}")
        # fewer codes than the tokenizer's sequence only decode as a prefix; say so now, not after sampling
        (maker, _, made), (decoder, _, wanted) = stages[-2:]
        if made < wanted and not tok.accepts_prefixes:
            raise ArgenError(f"{maker} makes {made} codes per image, {decoder} decodes exactly {wanted} "
                             "(it does not decode prefixes)")

    @property
    def gpt(self) -> Generator:
        """The generator (its name before generators other than GPT existed)."""
        return self.generator

    @property
    def is_text_to_image(self) -> bool:
        return self.generator.is_text_conditional

    def to(self, device):
        for module in (self.generator, self.refiner, self.tokenizer, self.text_encoder, self.drafter):
            if module is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    @property
    def decoder_dtype(self) -> str:
        """The name (`DECODER_DTYPES`) of the dtype the tokenizer (and the refiner) run in."""
        dtype = next(self.tokenizer.parameters()).dtype
        return next((name for name, d in DECODER_DTYPES.items() if d == dtype), str(dtype))

    # ---- loading / saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", tokenizer=None, text_encoder_path=None, weights="fp32",
                        drafter=None, decoding: Optional[dict] = None, decoder_dtype: str = "fp32"):
        """Load a shipped pipeline by name ("default-c2i", "default-t2i") or from a folder.

        `tokenizer` overrides the recorded tokenizer (a name or a folder); `text_encoder_path`
        points a recorded text encoder at a local folder on this machine; `weights` stores the
        generator's decode-step weights as "fp32" (as trained, the exact reference), "fp32-packed"
        (the same numbers to rounding, oneDNN's kernel), "bf16" or weight-only "int8", or "auto"
        (fp32-packed for a generator large enough to gain from it on CPU, else fp32;
        `Generator.set_weight_format`); `drafter` (a name or a folder) overrides the recorded
        draft model (`pipeline.json`'s optional "drafter"); `decoding` (`steps=`, `guidance_scale=`)
        changes the decoding settings of a tokenizer with a flow decoder (`set_decoding`);
        `decoder_dtype` "bf16" runs the tokenizer's network, and the refiner's, in bfloat16 (a flow
        decoder still integrates in float32, a refiner samples from float32 logits): a faster
        decode where the hardware has bf16 matrix units."""
        if decoder_dtype not in DECODER_DTYPES:
            raise ArgenError(f"decoder dtype must be one of {', '.join(DECODER_DTYPES)}, got {decoder_dtype!r}")
        device = check_device(device)
        found = inspect_model_dir(name_or_path)
        folder, meta = found.folder, found.meta

        def component(ref, kind):
            # an empty name is not the pipeline's own folder (folder / ""): resolve_model_dir refuses it
            path = folder / ref if str(ref).strip() and (folder / str(ref)).is_dir() else resolve_model_dir(ref)
            return load_component(path, kind, device=device)

        # the generator first: a tokenizer's or classifier's folder given as a model is named as such
        generator = load_component(found.gpt_dir, Generator, device=device)
        tok_ref = tokenizer if tokenizer is not None else meta.get("tokenizer")
        if tok_ref is None:  # (eval and bench have no --tokenizer: name the pipeline file to fix)
            raise ArgenError(f"{folder}: {PIPELINE_FILE} names no tokenizer; record one there (\"tokenizer\": NAME_OR_FOLDER)"
                             f" or give one (argen generate --tokenizer, ARPipeline.from_pretrained(tokenizer=...))")
        if weights != "fp32":  # an option of generators that offer it (GPT); fp32 is every model's own
            if hasattr(generator, "set_weight_format"):
                generator.set_weight_format(weights)
            elif weights != "auto":
                raise ArgenError(f"--weights {weights}: {type(generator).__name__} has no other weight formats")
        refiner = component(meta["refiner"], Refiner) if meta.get("refiner") else None
        draft_ref = drafter or meta.get("drafter")
        draft_model = component(draft_ref, Generator).eval() if draft_ref else None
        encoder = None
        if generator.is_text_conditional:
            from .text import text_encoder_from_config

            if "text_encoder" not in meta:
                raise ArgenError(f"{folder}: text-conditional model without a text_encoder entry in {PIPELINE_FILE}")
            encoder = text_encoder_from_config(meta["text_encoder"], device, path=text_encoder_path)
        defaults = dict(meta.get("defaults") or {})
        if "default_cfg_scale" in meta:  # pipeline.json files written before `defaults` existed
            defaults.setdefault("cfg_scale", meta["default_cfg_scale"])
        image_tokenizer = component(tok_ref, ImageTokenizer).set_decoding(**(decoding or {}))
        if decoder_dtype != "fp32":  # loaded as fp32; nn.Module.to: diffusers' to() warns about a cast it allows
            # both networks that turn generated tokens into images; the refiner's logits stay fp32
            for network in (image_tokenizer, refiner):
                if network is not None:
                    torch.nn.Module.to(network, DECODER_DTYPES[decoder_dtype])
        pipe = cls(generator, image_tokenizer, encoder, meta.get("class_names"), defaults, meta.get("crop"), refiner,
                   draft_model)
        pipe._folder = folder
        try:  # the sampling defaults are checked where they are read, naming the file
            pipe.sampling_params()
        except ArgenError as err:
            raise ArgenError(f"{folder / PIPELINE_FILE}: defaults: {err}") from None
        return pipe

    def save_pretrained(self, save_directory, dtype: Optional[torch.dtype] = None, **_):
        """Write a self-contained folder: pipeline.json + generator/ + tokenizer/ (+ refiner/, drafter/)."""

        def write(tmp: Path):
            self.generator.save_pretrained(tmp / "generator", dtype=dtype)
            self.tokenizer.save_pretrained(tmp / "tokenizer", dtype=dtype)
            if self.refiner is not None:
                self.refiner.save_pretrained(tmp / "refiner", dtype=dtype)
            if self.drafter is not None:
                self.drafter.save_pretrained(tmp / "drafter", dtype=dtype)
            text = pipeline_json(generator="generator", tokenizer="tokenizer",
                                 refiner="refiner" if self.refiner is not None else None,
                                 drafter="drafter" if self.drafter is not None else None, class_names=self.class_names,
                                 defaults=self.defaults, crop=self.crop,
                                 text_encoder=self.text_encoder.config() if self.text_encoder is not None else None)
            (tmp / PIPELINE_FILE).write_text(text)
            if self.is_text_to_image and self.class_names:
                save_class_descriptions(tmp, self.text_encoder, self.class_names)

        atomic_directory_write(Path(save_directory), write, kind="pipeline")

    # ---- inputs ---------------------------------------------------------------------------

    def resolve_class(self, value: Union[int, str]) -> int:
        """A class id or name -> id, with a one-line error listing valid names."""
        from .data.classes import resolve_model_class

        return resolve_model_class(value, self.class_names, self.generator.num_classes)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ArgenError("empty prompt: describe the image to generate")
            n = self.text_encoder.count_tokens(prompt)
            if n > self.text_encoder.max_length:
                raise ArgenError(f"prompt too long: {n} tokens, the model reads at most {self.text_encoder.max_length}")

    def sampling_params(self, cfg_scale: Optional[float] = None, cfg_schedule: Optional[str] = None,
                        **options) -> SamplingParams:
        """SamplingParams with this model's default guidance where cfg_scale / cfg_schedule are None
        (`pipeline.json` "defaults": "cfg_scale", 2.0 if absent, and "cfg_schedule", constant if absent)."""
        scale = self.defaults.get("cfg_scale", 2.0) if cfg_scale is None else cfg_scale
        schedule = self.defaults.get("cfg_schedule", "constant") if cfg_schedule is None else cfg_schedule
        return SamplingParams(cfg_scale=scale, cfg_schedule=schedule, **options)

    # ---- the generation path --------------------------------------------------------------

    def prompt_features(self, prompts: Sequence[str]):
        """Features [N, T, D] and mask [N, T] for each prompt. Each distinct prompt is encoded on
        its own and remembered, so its features never depend on which prompts share a call."""
        self.check_prompts(sorted(set(prompts)))
        for prompt in prompts:
            if prompt not in self._prompt_features:
                feats, mask = self.text_encoder.encode([prompt], device=self.device)
                self._prompt_features[prompt] = (feats.to(self.dtype), mask)
        feats, masks = zip(*(self._prompt_features[p] for p in prompts))
        return torch.cat(feats), torch.cat(masks)

    def conditions(self, prompt=None, class_labels=None, num_images: int = 1) -> Conditions:
        """One condition per image: `num_images` per prompt or per class, in order."""
        if (prompt is None) == (class_labels is None):
            raise ArgenError("give either a prompt (text-to-image) or class labels (class-conditional)")
        if prompt is not None:
            if not self.is_text_to_image:
                raise ArgenError("this is a class-conditional model: pass class labels, not a prompt")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ArgenError("empty prompt list")
            index = [i for i in range(len(prompts)) for _ in range(num_images)]
            feats, mask = self.prompt_features([prompts[i] for i in index])
            return Conditions(feats, mask, index)
        if self.is_text_to_image:
            raise ArgenError("this is a text-to-image model: pass a prompt, not class labels")
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):  # a tensor / array of class ids
            if isinstance(class_labels, torch.Tensor):
                integral = not (class_labels.is_floating_point() or class_labels.is_complex()
                                or class_labels.dtype == torch.bool)
            else:
                integral = class_labels.dtype.kind in "iu"
            if not integral or class_labels.ndim > 1:
                raise ArgenError(f"class_labels must be integer class ids (one, or a 1-D list), got a "
                                 f"{class_labels.dtype} tensor of shape {tuple(class_labels.shape)}")
            class_labels = class_labels.tolist()
        if isinstance(class_labels, bool):
            raise ArgenError("class_labels must be a class id or name (or a list of them), got a bool")
        values = [class_labels] if isinstance(class_labels, (int, str, np.integer)) else list(class_labels)
        if not values:
            raise ArgenError("empty class list")
        ids = [self.resolve_class(v) for v in values]
        labels = [i for i in ids for _ in range(num_images)]
        return Conditions(torch.tensor(labels, device=self.device), None, labels)

    def compile(self, mode: str = "default") -> "ARPipeline":
        """torch.compile the generator's decode step (`GPT.compile_decode`), the refiner's pass
        (`Refiner.compile_pass`, when there is one) and the tokenizer's decoder where it has one worth
        compiling (`ImageTokenizer.compile_decoder`: FlexTok's flow network). Each new batch and window
        shape costs a compile once (seconds for the shipped models), after which a step of default-c2i
        in fp32 runs 1.8-2.4x faster than eager at batch 1 on one CPU thread and 1.3x at 16 and 50
        (docs/history/decode.md, sessions 27 and 29). Compiled products sum in other orders than eager ones, so
        logits lie ~1e-5 from eager's and 1.6-2.9% of images draw another token near a tie (every mode, 512
        images; FID unchanged: issue 12, session 29); a compiled flow decoder's images lie within 1e-5.
        Worth it for many images. The modes "max-autotune" (oneDNN's GEMMs) and "max-autotune-cpp" (inductor's
        own) freeze the weights into the graphs (10-20 s per shape); the second is the fast one at batch 1
        (`GPT.compile_decode`). Every mode gives a seed the same image at any batch size."""
        if not hasattr(self.generator, "compile_decode"):
            raise ArgenError(f"--compile: the generator {type(self.generator).__name__} has no compile_decode()")
        self.generator.compile_decode(mode)
        if self.refiner is not None:
            self.refiner.compile_pass(mode)
        self.tokenizer.compile_decoder(mode)
        return self

    def check_num_tokens(self, num_tokens: Optional[int]) -> Optional[int]:
        """`num_tokens` (sample only the first n positions) checked against the chain: the tokenizer
        must decode prefixes (`accepts_prefixes`, e.g. FlexTok), and 1 <= n <= the generator's positions."""
        if num_tokens is None:
            return None
        if not getattr(self.tokenizer, "accepts_prefixes", False):
            raise ArgenError(f"--num-tokens: this model's tokenizer ({type(self.tokenizer).__name__}) decodes only "
                             f"complete sequences of {self.tokenizer.num_tokens} codes, not prefixes")
        if self.refiner is not None:
            raise ArgenError("--num-tokens: a pipeline with a refiner needs every position")
        limit = self.generator.num_positions
        return check_number("num_tokens", num_tokens, 1, limit, integer=True)

    def sample_tokens(self, conds: Conditions, seeds: Sequence[int], sampler: Union[str, Sampler] = "ar",
                      params: Optional[SamplingParams] = None, batch_size: int = 16,
                      progress: bool = False, num_tokens: Optional[int] = None) -> SamplerOutput:
        """Generator tokens [N, n] for every condition, in batches of `batch_size`; image i
        draws only from seeds[i], so it is the same whatever the batching. The output's counters
        cover all batches (num_forward_passes summed over batches). `num_tokens` samples only the
        first n positions (a tokenizer that decodes prefixes, `check_num_tokens`); default all."""
        num_tokens = self.check_num_tokens(num_tokens)
        if isinstance(sampler, str):
            sampler = get_sampler(sampler)
        elif not isinstance(sampler, Sampler):
            raise ArgenError(f"sampler must be a name such as 'ar' or 'gsd:G=10', or a Sampler, got {sampler!r}")
        sampler.prepare(tokenizer=self.tokenizer, refiner=self.refiner, draft=self.drafter)
        params = params or self.sampling_params()
        outs = []
        bar = progress_bar(total=len(conds), desc="generating", unit="images", enabled=progress)
        for lo in range(0, len(conds), batch_size):
            hi = min(lo + batch_size, len(conds))
            part = conds[lo:hi]
            outs.append(sampler(self.generator, part.cond, params=params, cond_mask=part.mask,
                                num_tokens=num_tokens, seeds=list(seeds[lo:hi])))
            bar.update(hi - lo)
        bar.close()
        return SamplerOutput(tokens=torch.cat([o.tokens for o in outs]),
                             num_forward_passes=sum(o.num_forward_passes for o in outs),
                             accepted_per_forward=[a for o in outs for a in o.accepted_per_forward],
                             forwards_per_sample=torch.cat([o.nfe_per_sample for o in outs]),
                             draft_forward_passes=sum(o.draft_forward_passes for o in outs),
                             draft_forwards_per_sample=None if outs[0].draft_forwards_per_sample is None else
                             torch.cat([o.draft_forwards_per_sample for o in outs]))

    @torch.no_grad()
    def tokens_to_images(self, tokens: torch.Tensor, conds: Optional[Conditions] = None,
                         seeds: Optional[Sequence[int]] = None, batch_size: int = 64) -> torch.Tensor:
        """Generator tokens [N, n] -> images [N, C, H, W] in [-1, 1]: refine (when there is a
        refiner), decode with the tokenizer (image i with seeds[i]), crop."""
        images = []
        for lo in range(0, tokens.shape[0], batch_size):
            hi = min(lo + batch_size, tokens.shape[0])
            part_seeds = None if seeds is None else list(seeds[lo:hi])
            codes = self.generator.tokens_to_codes(tokens[lo:hi].to(self.device))
            if self.refiner is not None:
                if conds is None:
                    raise ArgenError("this pipeline has a refiner: pass the conditions the tokens were sampled with")
                part = conds[lo:hi]
                codes = self.refiner.refine(codes, part.cond, part.mask, seeds=part_seeds)
            images.append(self.tokenizer.decode(codes, seeds=part_seeds).float())
        images = torch.cat(images).clamp(-1, 1)
        if self.crop and self.crop < images.shape[-1]:
            top = (images.shape[-2] - self.crop) // 2
            left = (images.shape[-1] - self.crop) // 2
            images = images[..., top:top + self.crop, left:left + self.crop]
        return images

    def read_prompt(self, prompt: str) -> PromptReading:
        """The class `prompt` is closest to, by cosine similarity of sentence embeddings to the
        class descriptions (for Fashion-MNIST: every garment name the training captions use);
        `known` is False when even the closest is below `KNOWN_PROMPT_SIMILARITY`."""
        if not self.is_text_to_image:
            raise ArgenError("read_prompt needs a text-to-image pipeline")
        if not self.class_names:
            raise ArgenError("read_prompt needs the classes the model was trained on; this pipeline names none")
        if getattr(self, "_class_descriptions", None) is None:
            # Kept on the CPU: the pipeline may move to another device after the first call.
            saved = None if self._folder is None else load_class_descriptions(self._folder, self.text_encoder,
                                                                                 self.class_names)
            self._class_descriptions = saved or class_description_embeddings(self.text_encoder, self.class_names)
        embeddings, labels = self._class_descriptions
        similarity = (self.text_encoder.sentence_embeddings([prompt]).cpu() @ embeddings.T)[0]
        best = int(similarity.argmax())
        label = int(labels[best])
        value = float(similarity[best])
        return PromptReading(label, self.class_names[label], value, value >= KNOWN_PROMPT_SIMILARITY)

    @torch.no_grad()
    def __call__(self, prompt: Union[None, str, Sequence[str]] = None,
                 class_labels: Union[None, int, str, Sequence[Union[int, str]]] = None,
                 num_images: int = 1, sampler: Union[str, Sampler] = "ar", cfg_scale: Optional[float] = None,
                 cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 16, progress: bool = True,
                 cfg_schedule: Optional[str] = None, num_tokens: Optional[int] = None) -> ARPipelineOutput:
        """Generate `num_images` images per prompt (t2i) or per class (c2i).

        Image i (counting over all prompts/classes) is sampled with seed `seed + i`, so it is
        the same whatever `batch_size` is. `num_tokens` generates only the first n tokens and
        decodes that prefix (tokenizers with `accepts_prefixes`, such as FlexTok). `cfg_scale` and
        `cfg_schedule` default to the model's (`sampling_params`).
        """
        num_images = check_number("num_images", num_images, 1, None, integer=True)
        batch_size = check_number("batch_size", batch_size, 1, None, integer=True)
        seed = check_seed("seed", seed)
        if isinstance(sampler, str):
            sampler = get_sampler(sampler)
        params = self.sampling_params(cfg_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k,
                                      top_p=top_p, cfg_schedule=cfg_schedule)
        num_tokens = self.check_num_tokens(num_tokens)
        conds = self.conditions(prompt, class_labels, num_images)
        if seed + len(conds) - 1 > MAX_SEED:
            raise ArgenError(f"seed {seed} + {len(conds)} images runs past the largest seed {MAX_SEED} "
                             f"(image i uses seed + i); use a seed <= {MAX_SEED - len(conds) + 1}")
        seeds = [seed + i for i in range(len(conds))]
        start = time.perf_counter()
        out = self.sample_tokens(conds, seeds, sampler, params, batch_size, progress, num_tokens)
        images = self.tokens_to_images(out.tokens, conds, seeds)
        return ARPipelineOutput(images=to_pil(images), tokens=out.tokens.cpu(), labels=conds.labels, seeds=seeds,
                                num_forward_passes=out.num_forward_passes, seconds=time.perf_counter() - start)
