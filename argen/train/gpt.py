"""GPT training on VQ codes of Fashion-MNIST (`argen train gpt`), class- or text-conditional.

1. The whole train split is encoded once with the trained VQ and cached
   (`<out>/codes_train.safetensors`, keyed by a hash of the VQ weights, the item limit and the
   flip option); `--flip` adds horizontally flipped copies as augmentation.
2. Teacher forcing as LlamaGen: input idx = codes[:, :-1], logits = model(idx, cond)[:,
   cls_token_num - 1:], cross-entropy against all block_size codes. With `shuffle=s` the model is
   a `TokenShuffleGPT`: codes are put in its window order (`codes_to_tokens`), the input drops
   the last window (s² codes), and the cross-entropy still covers every original code. The model applies class /
   caption dropout itself in train mode (CFG needs it).
3. t2i: each item gets a caption drawn with random.Random seeded by (seed, epoch, index): it
   varies over epochs yet a resumed run sees the same captions. `--captions basic` draws from
   `argen.data.captions.train_caption` (a few hundred strings); `--captions rich` from a fixed pool
   of rich captions per class and measured shade (`rich_caption_pool`). Text features of every
   caption that can occur are computed once and looked up per batch. `--text-pooling mean` makes
   the condition one slot, MiniLM's sentence embedding, instead of one slot per token.
   `--init-from MODEL` starts from another generator's weights; from a c2i model, the caption
   projection is first fitted onto its class embeddings (`init_weights`).
4. `--distill-from MODEL` (draft models for the `draft` sampler): the loss is instead the KL
   divergence from MODEL's guided next-token distribution to the student's, both at `--distill-cfg`
   through the samplers' own logits path (`distill_loss`).
5. The EMA weights are exported to `<out>/model` with `pipeline.json` (tokenizer, model type,
   class names, text encoder), a sample grid and a model card.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..data import captions as captions_mod
from ..data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, pad_image, to_model_range
from ..atomic import atomic_write, atomic_write_text
from ..imageio import save_grey_figure
from ..errors import ArgenError
from ..hub import PIPELINE_FILE, SHIPPED_MODELS, inspect_model_dir, resolve_model_dir
from ..models.base import Generator
from ..models.gpt import GPT, GPTConfig
from ..models.token_shuffle import TokenShuffleConfig, TokenShuffleGPT
from ..pipeline import CLASS_DESCRIPTIONS_FILE, ARPipeline, pipeline_json, save_class_descriptions
from ..registry import load_component
from ..tokenizers.base import ImageTokenizer
from .common import (Trainer, TrainConfig, check_batch_size, check_run_args, check_trainable_size, seed_everything,
                     set_threads, write_json)
from .rundir import check_codes_cache, check_run_dir, claim_run_dir, list_in_marker

CODES_NAME = "codes_train.safetensors"


# --------------------------------------------------------------------------------------------
# Codes


def _weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "diffusion_pytorch_model.safetensors"):
        p = folder / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(vq: ImageTokenizer, images_uint8: torch.Tensor, flip: bool = False, batch_size: int = 500,
                  progress: bool = False) -> torch.Tensor:
    """uint8 [N, 28, 28] -> codes [N, n] (int16), padded to the tokenizer's image size first."""
    from ..progress import progress as with_progress

    out = []
    for start in with_progress(range(0, len(images_uint8), batch_size), desc="encode training set", unit="batches",
                               enabled=progress):
        x = pad_image(to_model_range(images_uint8[start:start + batch_size]).unsqueeze(1), vq.image_size)
        if flip:
            x = x.flip(-1)
        out.append(vq.encode(x).flatten(1).to(torch.int16))
    return torch.cat(out)


def load_or_encode_codes(vq: ImageTokenizer, vq_dir: Path, images: torch.Tensor, cache: Path, flip: bool,
                         limit: Optional[int], progress: bool) -> torch.Tensor:
    """Codes of `images` (and their flips, appended) from `cache` if it matches, else encoded and cached."""
    key = {"vq": _weights_hash(vq_dir), "items": str(len(images)), "flip": str(bool(flip)), "limit": str(limit)}
    if cache.is_file():
        try:
            with safe_open(str(cache), "pt") as f:
                meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in key.items()):
                    return f.get_tensor("codes")
        except Exception:  # noqa: BLE001 - a broken cache is simply rebuilt
            pass
    codes = encode_images(vq, images, progress=progress)
    if flip:
        codes = torch.cat([codes, encode_images(vq, images, flip=True, progress=progress)])
    data = safetensors_bytes({"codes": codes.contiguous()}, metadata=key)
    atomic_write(cache, lambda handle: handle.write(data))
    return codes


# --------------------------------------------------------------------------------------------
# Captions


#: Rich captions per (class, shade) in the pool: enough variety for a short run, small enough
#: to encode once (sentence embeddings: 30,000 captions in a few minutes on one CPU thread).
#: Token features take 32x the memory, so a token-feature encoder gets a smaller pool.
RICH_POOL_SIZES = {"mean": 1500, "tokens": 100}
CAPTION_STYLES = ("basic", "rich")


class Captions:
    """Training captions of one style, and their text features computed once.

    "basic": `captions.train_caption` (a few hundred strings). "rich": a fixed pool of
    `captions.rich_caption_pool` per (class, measured shade). Either way the caption of item
    `index` in `epoch` depends on (seed, epoch, index) only, so a resumed run sees the same ones.
    """

    def __init__(self, style: str, encoder, seed: int = 0):
        if style not in CAPTION_STYLES:
            raise ArgenError(f"unknown caption style {style!r}: use one of {', '.join(CAPTION_STYLES)}")
        self.style = style
        self.seed = seed
        self.pool = captions_mod.rich_caption_pool(RICH_POOL_SIZES[encoder.pooling]) if style == "rich" else None
        if self.pool is not None:
            texts = sorted({t for group in self.pool.values() for t in group})
        else:
            texts = sorted({c for label in range(len(CLASS_NAMES)) for c in captions_mod.all_train_captions(label)})
        self.texts = texts
        self.ids = {t: i for i, t in enumerate(texts)}
        self.feats, self.masks = _encode_all(encoder, texts)
        self.labels = None
        if self.pool is not None:
            self.labels = torch.empty(len(texts), dtype=torch.long)
            for (label, _), group in self.pool.items():
                self.labels[[self.ids[t] for t in group]] = label

    def caption(self, epoch: int, index: int, label: int, image_uint8) -> str:
        rng = random.Random(f"argen-t2i:{self.seed}:{epoch}:{index}")
        if self.pool is None:
            return captions_mod.train_caption(label, image_uint8, rng)
        return rng.choice(self.pool[(label, captions_mod.attribute_for(image_uint8))])


def _encode_all(encoder, texts: list, batch: int = 256):
    feats, masks = [], []
    for start in range(0, len(texts), batch):
        f, m = encoder.encode(texts[start:start + batch])
        feats.append(f.float())
        masks.append(m)
    return torch.cat(feats), torch.cat(masks)


class CodeBatches:
    """Batches of (codes, condition) by (epoch, index) keys.

    c2i: {"codes", "labels"}. t2i: {"codes", "caption_ids"}; the caption of an item depends on
    (seed, epoch, index) only. Items N..2N-1 are the flipped copies when flip is on.
    """

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor, images_uint8: torch.Tensor, model_type: str,
                 captions: Optional[Captions] = None):
        self.codes = codes
        self.labels = labels
        self.images = images_uint8
        self.model_type = model_type
        self.captions = captions
        self.base = len(labels)

    def __len__(self):
        return len(self.codes)

    def __getitems__(self, keys):
        index = torch.tensor([i for _, i in keys], dtype=torch.long)
        base_index = index % self.base
        batch = {"codes": self.codes[index].long()}
        labels = self.labels[base_index]
        if self.model_type == "c2i":
            batch["labels"] = labels
        else:
            ids = []
            for (epoch, i), b in zip(keys, base_index.tolist()):
                text = self.captions.caption(epoch, i, int(self.labels[b]), self.images[b].numpy())
                ids.append(self.captions.ids[text])
            batch["caption_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


def training_items(limit: Optional[int], flip: bool, data_root=None) -> int:
    """How many items `training_codes` gives (the train split up to `limit`, doubled by `flip`), before anything
    is encoded."""
    images, _ = load_fashion_mnist("train", data_root)
    return len(images[:limit]) * (2 if flip else 1)


def training_codes(vq_model, vq_dir, out: Path, accelerator, codes_cache, flip: bool, limit: Optional[int],
                   progress: bool, data_root=None):
    """(images, labels, codes) of the Fashion-MNIST train split for a run in `out`: the main
    process encodes (or reads the cache), the others wait and then read what it wrote."""
    images, labels = load_fashion_mnist("train", data_root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    cache = Path(codes_cache) if codes_cache else out / CODES_NAME
    if accelerator.is_main_process:
        codes = load_or_encode_codes(vq_model, vq_dir, images, cache, flip, limit, progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        codes = load_or_encode_codes(vq_model, vq_dir, images, cache, flip, limit, False)
    return images, labels, codes


# --------------------------------------------------------------------------------------------
# Sampling for the model card


@torch.no_grad()
def sample_grid(pipe, labels: torch.Tensor, prompts=None, seeds=None) -> torch.Tensor:
    """AR samples through the pipeline's generation path, one per class label (text models: one
    per prompt) -> images [B, 1, H, W] in [-1, 1]."""
    conds = pipe.conditions(prompt=prompts) if prompts is not None else pipe.conditions(class_labels=labels)
    seeds = list(range(len(conds))) if seeds is None else list(seeds)
    tokens = pipe.sample_tokens(conds, seeds, "ar", pipe.sampling_params(), batch_size=len(conds)).tokens
    return pipe.tokens_to_images(tokens, conds, seeds)


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    B, _, H, W = images.shape
    cols = B // rows
    grid = images[: rows * cols, 0].reshape(rows, cols, H, W).permute(0, 2, 1, 3).reshape(rows * H, cols * W)
    save_grey_figure(grid, path, scale)


# --------------------------------------------------------------------------------------------


def train_gpt(out, *, model_type: str, vq, steps: Optional[int] = None, epochs: Optional[float] = None,
              batch_size: int = 64, lr: float = 1e-3, seed: int = 0, warmup_steps: int = 200,
              weight_decay: float = 0.05, ema_decay: float = 0.999, grad_clip: float = 1.0,
              size: Optional[str] = None, dim: int = 320, n_layer: int = 6, n_head: int = 5,
              dropout: float = 0.0, class_dropout: float = 0.1, flip: bool = False,
              codes_cache=None, text_encoder: str = "minilm", tokenizer_name: Optional[str] = None,
              text_pooling: str = "tokens", text_max_length: Optional[int] = None, captions: str = "basic",
              init_from: Optional[str] = None,
              cfg_scale: float = 2.0, limit: Optional[int] = None, ckpt_every: int = 500, log_every: int = 25,
              resume: bool = False, threads: Optional[int] = None, progress: bool = True,
              export_dtype: str = "auto", command: Optional[str] = None, samples_per_class: int = 10,
              eval_items: int = 2000, accuracy_per_class: int = 30, data_root=None,
              stop_at_step: Optional[int] = None, refiner=None, coarse_clusters: Optional[int] = None,
              kmeans_seed: int = 0, kmeans_normalize: bool = False,
              shuffle: Optional[int] = None, shuffle_blocks: Optional[int] = None,
              shuffle_hidden: Optional[int] = None, shuffle_mlp: Optional[str] = None,
              distill_from: Optional[str] = None,
              distill_cfg: Optional[float] = None) -> dict:
    """Train a c2i or t2i GPT on codes of the VQ `vq` (folder or shipped name); returns final metrics.

    Coarse-to-fine stage 1: with `refiner` (a CTF refiner folder) and/or `coarse_clusters` K, the
    GPT is trained on the cluster ids of the codes (vocabulary K) instead of the codes. The map
    is the refiner's when its folder exists, else k-means with `kmeans_seed` (the same function
    the refiner's training calls, so both agree); the export needs the refiner (it is copied
    into the exported pipeline), so a run finished before its refiner exports with `--resume`.
    `shuffle=s` trains a `TokenShuffleGPT` (s x s windows of codes per position) instead, with
    `shuffle_blocks` residual MLP blocks per side (default 2) `shuffle_hidden` wide (default: the FFN's), of
    kind `shuffle_mlp` ("swiglu", the default, or "plain": `TokenShuffleConfig.shuffle_mlp_kind`).
    `distill_from` (a generator over the same codes): train on `distill_loss` against it at guidance
    `distill_cfg` (default: its pipeline's default guidance) instead of the cross-entropy.
    """
    from ..distributed import make_accelerator

    set_threads(threads)
    if model_type not in ("c2i", "t2i"):
        raise ArgenError(f"model type must be c2i or t2i, got {model_type!r}")
    check_run_args(steps, epochs, export_dtype, limit=limit)
    if cfg_scale > 1 and class_dropout == 0:  # the export samples its grid with guidance
        raise ArgenError(f"--cfg-scale {cfg_scale:g} (the export's sample grid) needs a null condition: train with "
                         "--class-dropout above 0, or pass --cfg-scale 1")
    # an unknown size or a width the heads do not divide is refused before the codes cache is written
    GPTConfig.from_name(size) if size else GPTConfig(dim=dim, n_layer=n_layer, n_head=n_head)
    check_codes_cache(codes_cache)
    check_run_dir(out, resume)
    vq_dir = resolve_model_dir(vq)
    vq_model = load_component(vq_dir, ImageTokenizer).float().eval()  # any registered tokenizer, 2D or 1D
    num_codes, grid = vq_model.num_tokens, vq_model.grid
    code_to_cluster = _coarse_map(vq_model, refiner, coarse_clusters, kmeans_seed, kmeans_normalize, model_type)
    if shuffle is not None:  # refused before any data is encoded
        _check_shuffle(shuffle, grid)
    elif shuffle_blocks is not None or shuffle_hidden is not None or shuffle_mlp is not None:
        raise ArgenError("--shuffle-blocks / --shuffle-hidden / --shuffle-mlp shape a Token-Shuffle model: add --shuffle S")
    teacher, distill_params = None, None
    if distill_from is not None:
        if shuffle is not None or code_to_cluster is not None:
            raise ArgenError("--distill-from trains a plain GPT on the codes: drop --shuffle / --refiner / --coarse-clusters")
        teacher, distill_params = _load_teacher(distill_from, distill_cfg, model_type, vq_model)
    encoder = None
    if model_type == "t2i":  # its width shapes the model
        encoder = _load_encoder(text_encoder, text_max_length, text_pooling)

    # 2D RoPE over a tokenizer's grid (grid_size only when it is not square), 1D RoPE for 1D codes
    grid_fields = dict(rope_type="1d") if grid is None else dict(grid_size=tuple(grid) if grid[0] != grid[1] else None)
    vocab = vq_model.vocab_size if code_to_cluster is None else int(code_to_cluster.max()) + 1
    fields = dict(vocab_size=vocab, block_size=num_codes, **grid_fields,
                  num_classes=len(CLASS_NAMES), model_type=model_type, class_dropout_prob=class_dropout,
                  token_dropout_p=dropout, resid_dropout_p=dropout, ffn_dropout_p=dropout, multiple_of=64)
    if model_type == "t2i":
        fields.update(cls_token_num=encoder.num_slots, caption_dim=encoder.feature_dim,
                      caption_token_num=encoder.num_slots)
    config_cls, model_cls = (GPTConfig, GPT) if shuffle is None else (TokenShuffleConfig, TokenShuffleGPT)
    if shuffle is not None:
        fields["shuffle"] = shuffle
        if shuffle_blocks is not None:
            fields["shuffle_mlp_blocks"] = shuffle_blocks
        if shuffle_hidden is not None:
            fields["shuffle_mlp_hidden"] = shuffle_hidden
        if shuffle_mlp is not None:
            fields["shuffle_mlp_kind"] = shuffle_mlp
    gpt_cfg = config_cls.from_name(size, **fields) if size else config_cls(dim=dim, n_layer=n_layer, n_head=n_head,
                                                                           **fields)
    check_trainable_size(lambda: model_cls(gpt_cfg), "this GPT")
    check_batch_size(training_items(limit, flip, data_root), batch_size)
    # a warm start that is not a GPT is refused before the run folder is claimed and the training set encoded
    init_source = GPT.from_pretrained(resolve_model_dir(init_from)).float() if init_from is not None else None

    accelerator = make_accelerator()
    out = claim_run_dir(out, resume, accelerator.is_main_process)

    t_prep = time.time()
    images, labels, codes = training_codes(vq_model, vq_dir, out, accelerator, codes_cache, flip, limit, progress,
                                           data_root)
    if code_to_cluster is not None:
        codes = code_to_cluster[codes.long()].to(torch.int16)  # stage 1 learns the coarse labels only
    num_items = len(codes)

    caption_set, enc_config = None, None
    if model_type == "t2i":
        caption_set = caption_table(encoder, captions, seed)
        cap_feats, cap_masks = caption_set.feats, caption_set.masks
        enc_config = dict(encoder.config())
        if enc_config.get("name") == "minilm":
            enc_config["path"] = None  # found again from the installed package
    prep_s = time.time() - t_prep

    if epochs is not None:
        steps = max(1, math.ceil(epochs * (num_items // (batch_size * accelerator.num_processes))))
    cfg = TrainConfig(out=str(out), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, ema_decay=ema_decay, grad_clip=grad_clip, seed=seed,
                      ckpt_every=ckpt_every, log_every=log_every, resume=resume, progress=progress)

    torch.manual_seed(seed)  # identical init on every process
    model = model_cls(gpt_cfg)
    k = model.tokens_per_position
    init_info = init_weights(model, init_source, caption_set) if init_from is not None else None
    seed_everything(seed + accelerator.process_index)

    dataset = CodeBatches(codes, labels, images, model_type, caption_set)
    cls = gpt_cfg.cls_token_num

    def loss_fn(m, batch):
        # generator order (identity for GPT); the last position's k codes are only targets
        x = model.codes_to_tokens(batch["codes"])
        if teacher is not None:
            if model_type == "c2i":
                cond, mask = batch["labels"], None
            else:
                cond, mask = cap_feats[batch["caption_ids"]], cap_masks[batch["caption_ids"]]
            loss = distill_loss(m, model, teacher, x, cond, mask, distill_params)
            return loss, {"loss": loss}
        if model_type == "c2i":
            logits = m(x[:, :-k], batch["labels"])
        else:
            ids = batch["caption_ids"]
            logits = m(x[:, :-k], cap_feats[ids], cap_masks[ids])
        logits = logits[:, cls - 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
        return loss, {"loss": loss}

    run_info = {"kind": f"gpt-{model_type}", "vq": str(vq), "vq_hash": _weights_hash(vq_dir),
                "gpt_config": {k: v for k, v in model.config.items() if not k.startswith("_")},
                "parameters": model.num_parameters(), "train_items": num_items, "flip": flip,
                "text_encoder": enc_config,
                # None for the basic captions, so checkpoints from before rich captions still resume
                "captions": captions if model_type == "t2i" and captions != "basic" else None,
                "init_from": init_from, "init": init_info, "command": command, "prep_s": round(prep_s, 1),
                "distill": None if teacher is None else {"from": str(distill_from), "cfg_scale": distill_params.cfg_scale},
                "threads": torch.get_num_threads()}
    if code_to_cluster is not None:  # a resumed run must use the same clusters
        run_info["coarse"] = {"clusters": vocab, "map_sha": hashlib.sha256(
            code_to_cluster.numpy().tobytes()).hexdigest()[:16]}
    trainer = Trainer(cfg, model, dataset, loss_fn, num_items=num_items, loss_names=["loss"],
                      accelerator=accelerator, run_info=run_info, tokens_per_item=num_codes)
    trainer.fit(stop_at=stop_at_step)
    if not trainer.finished:
        return {"stopped_at": trainer.step}

    metrics = {}
    ctf = _load_coarse_refiner(refiner, code_to_cluster, vq_model) if code_to_cluster is not None else None
    if trainer.is_main:
        t0 = time.time()
        ema = trainer.ema_model()
        folder = out / "model"
        tok_name = tokenizer_name or (str(vq) if str(vq) in SHIPPED_MODELS else str(vq_dir))
        pipeline = {"tokenizer": tok_name, "class_names": list(CLASS_NAMES), "crop": 28,
                    "defaults": {"cfg_scale": cfg_scale}, "text_encoder": enc_config}
        if ctf is not None:
            pipeline["refiner"] = "refiner"  # copied into the export below: the folder is self-contained
        extra = {PIPELINE_FILE: pipeline_json(**pipeline)}
        if model_type == "t2i":
            extra["text_encoder.json"] = _json(enc_config)
        metrics = {"step": trainer.step, "train_wall_s": round(trainer.elapsed, 1), "prep_s": round(prep_s, 1),
                   "final_train_losses": trainer.last_losses, "parameters": model.num_parameters()}
        # Held-out-free sanity metric: teacher-forced loss of the EMA model on the test split.
        test_images, test_labels = load_fashion_mnist("test", data_root)
        n_test = min(eval_items, len(test_labels))
        test_codes = encode_images(vq_model, test_images[:n_test]).long()
        if code_to_cluster is not None:
            test_codes = code_to_cluster[test_codes]
        cond, mask = _conditions(model_type, test_labels[:n_test], encoder, test_images[:n_test], caption_set)
        metrics["test_items"] = n_test
        metrics["test_loss_ema_fp32"] = _test_loss(ema, test_codes, cond, mask)
        dtype = torch.float32 if export_dtype == "float32" else torch.float16
        ema.save_pretrained(folder, dtype=dtype, extra_files=extra)
        if export_dtype != "float32":
            half = model_cls.from_pretrained(folder).float()
            metrics["test_loss_fp16_export"] = _test_loss(half, test_codes, cond, mask)
            if export_dtype == "auto" and metrics["test_loss_fp16_export"] - metrics["test_loss_ema_fp32"] > 0.002:
                ema.save_pretrained(folder, dtype=torch.float32, extra_files=extra)
                dtype = torch.float32
        metrics["export_dtype"] = str(dtype).replace("torch.", "")
        if ctf is not None:
            ctf.save_pretrained(folder / "refiner", dtype=next(ctf.parameters()).dtype)
        final = model_cls.from_pretrained(folder).float().eval()
        # Sample grids and accuracy go through the pipeline's generation path; uncropped (32 px)
        # as the tokenizer decodes them.
        pipe = ARPipeline(final, vq_model, encoder, CLASS_NAMES, {"cfg_scale": cfg_scale},
                          refiner=None if ctf is None else ctf.float().eval())
        # Per-class sample grid: one row per class.
        n = samples_per_class
        grid_labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(n)
        prompts = None
        if model_type == "t2i":
            prompts = [captions_mod.HELDOUT_PROMPTS[c][0] for c in range(len(CLASS_NAMES))]
        imgs = sample_grid(pipe, grid_labels, None if prompts is None else [prompts[int(c)] for c in grid_labels])
        save_grid(imgs, len(CLASS_NAMES), folder / "samples.png")
        metrics["grid_prompts"] = prompts
        metrics["grid_samples"] = int(imgs.shape[0])
        if accuracy_per_class > 0:
            metrics["class_accuracy"] = class_accuracy(pipe, accuracy_per_class)
        metrics["eval_wall_s"] = round(time.time() - t0, 1)
        write_json(out / "metrics.json", {**metrics, "train_config": cfg.to_dict(), "run": run_info})
        write_json(folder / "metrics.json", {**metrics, "train_config": cfg.to_dict(), "run": run_info})
        write_gpt_card(folder, metrics, cfg, run_info, pipeline)
        if model_type == "t2i":  # read_prompt's class descriptions, embedded once here
            save_class_descriptions(folder, encoder, CLASS_NAMES)
        list_in_marker(folder, ["samples.png", "metrics.json", "MODEL_CARD.md", "refiner", CLASS_DESCRIPTIONS_FILE])
    accelerator.wait_for_everyone()
    return metrics


def _load_teacher(source, cfg_scale: Optional[float], model_type: str, vq_model):
    """The generator to distil from (a pipeline or generator folder, or a shipped name), frozen, and
    the SamplingParams of the distribution the student learns: the teacher's guided distribution
    at `cfg_scale`, by default its pipeline's default guidance."""
    from ..samplers.logits import SamplingParams

    found = inspect_model_dir(source)
    teacher = load_component(found.gpt_dir, Generator).float().eval().requires_grad_(False)
    if teacher.tokens_per_position != 1 or teacher.vocab_size != vq_model.vocab_size \
            or teacher.num_positions != vq_model.num_tokens or teacher.condition_kind != {"c2i": "class", "t2i": "text"}[model_type]:
        raise ArgenError(f"--distill-from {source}: a {model_type} generator over the codes of this tokenizer is needed "
                         f"({vq_model.num_tokens} codes, vocabulary {vq_model.vocab_size})")
    scale = float((found.meta.get("defaults") or {}).get("cfg_scale", 1.0)) if cfg_scale is None else cfg_scale
    params = SamplingParams(cfg_scale=scale)
    if params.uses_cfg and not teacher.supports_cfg:
        raise ArgenError(f"--distill-from {source}: the teacher has no null condition, so --distill-cfg must be <= 1")
    return teacher, params


def distill_loss(student, model, teacher, x, cond, mask, params) -> torch.Tensor:
    """Mean per-token KL(p || q): p the teacher's, q the student's processed next-token distribution
    (`process_logits`: CFG at params.cfg_scale, the same path the `draft` sampler draws from), both
    teacher-forced on the training codes x. A draft token is accepted with probability
    sum min(p, q) = 1 - TV(p, q), which this divergence bounds (Pinsker; DistillSpec, Zhou et al. 2024).

    student: the module being trained (maybe wrapped by accelerate); model: the same model unwrapped."""
    from ..samplers.logits import process_logits

    # (condition, null) pairs are fed explicitly: the student's own condition dropout would null
    # some conditional rows while the teacher's target for them stays conditional
    model.cls_embedding.eval()
    inputs = x[:, :-1]
    student_cond, teacher_cond = cond, cond
    if params.uses_cfg:
        student_cond = torch.cat([cond, model.null_condition(cond)])
        teacher_cond = torch.cat([cond, teacher.null_condition(cond)])
        inputs = torch.cat([inputs, inputs])
        mask = None if mask is None else torch.cat([mask, mask])
    start = model.condition_length(cond) - 1
    with torch.no_grad():
        target = process_logits(teacher(inputs, teacher_cond, mask)[:, start:], params).log_softmax(-1)
    log_q = process_logits(student(inputs, student_cond, mask)[:, start:], params).log_softmax(-1)
    return F.kl_div(log_q.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


_ENCODERS: dict = {}
_CAPTION_TABLES: dict = {}


def _coarse_map(vq_model, refiner, clusters, kmeans_seed, normalize, model_type) -> Optional[torch.Tensor]:
    """code -> cluster id [V] for a coarse (CTF stage-1) run, or None for a run on the codes."""
    if refiner is None and clusters is None:
        return None
    if model_type != "c2i":
        raise ArgenError("coarse-to-fine training is class-conditional only (the CTF refiner reads class ids)")
    if refiner is not None and Path(refiner).is_dir():
        ref = _load_coarse_refiner(refiner, None, vq_model)
        if clusters is not None and clusters != ref.in_vocab_size:
            raise ArgenError(f"--coarse-clusters {clusters} but the refiner {refiner} reads {ref.in_vocab_size} clusters")
        return ref.code_to_cluster.cpu().clone()
    if clusters is None:
        raise ArgenError(f"no refiner folder {str(refiner)!r}: train it first, or give --coarse-clusters K "
                         "(and the same --kmeans-seed) to train this stage meanwhile")
    from ..refiners.ctf import coarse_labels

    return coarse_labels(vq_model.codebook_embeddings(), clusters, kmeans_seed, normalize)


def _load_coarse_refiner(folder, code_to_cluster, vq_model):
    """The CTF refiner at `folder`, checked against the tokenizer and (if given) the GPT's clusters."""
    from ..refiners.base import Refiner

    if folder is None or not Path(folder).is_dir():
        raise ArgenError(f"the coarse GPT is trained but its refiner folder {str(folder)!r} does not exist: train "
                         "the refiner, then rerun this command with --refiner FOLDER --resume to export")
    ref = load_component(Path(folder), Refiner)
    if not hasattr(ref, "code_to_cluster"):
        raise ArgenError(f"{folder} holds a {type(ref).__name__}, not a coarse-to-fine refiner")
    if ref.vocab_size != vq_model.vocab_size or ref.num_tokens != vq_model.num_tokens:
        raise ArgenError(f"the refiner {folder} writes {ref.num_tokens} codes of vocabulary {ref.vocab_size}, the "
                         f"tokenizer takes {vq_model.num_tokens} of {vq_model.vocab_size}")
    if code_to_cluster is not None and not torch.equal(ref.code_to_cluster.cpu(), code_to_cluster):
        raise ArgenError(f"the refiner {folder} was trained on other clusters than this GPT (another K, k-means "
                         "seed or tokenizer)")
    return ref


def _load_encoder(name: str, max_length: Optional[int] = None, pooling: str = "tokens"):
    """Text encoders are loaded once per process (tests train several t2i models)."""
    from ..text import load_text_encoder

    key = (name, max_length, pooling)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_text_encoder(name, max_length, pooling=pooling)
    return _ENCODERS[key]


def caption_table(encoder, style: str = "basic", seed: int = 0) -> Captions:
    """`Captions` of a style for an encoder; cached per process (a pure function of the arguments)."""
    key = (repr(sorted(encoder.config().items())), style, seed)
    if key not in _CAPTION_TABLES:
        _CAPTION_TABLES[key] = Captions(style, encoder, seed)
    return _CAPTION_TABLES[key]


# --------------------------------------------------------------------------------------------
# Starting from another generator


def init_weights(model: GPT, source, caption_set: Optional[Captions] = None, fit_steps: int = 600) -> dict:
    """Start `model` from the generator `source` (shipped name or folder, or a loaded GPT): see `GPT.init_from`.
    From a class-conditional source into a text-conditional model, the caption projection is
    fitted on the training captions' features and class labels first."""
    src = source if isinstance(source, GPT) else GPT.from_pretrained(resolve_model_dir(source)).float()
    feats = labels = None
    if src.condition_kind == "class" and model.condition_kind == "text":
        if caption_set is None or caption_set.labels is None or caption_set.feats.shape[1] != 1:
            raise ArgenError("starting a text-to-image model from a class-conditional one needs one condition "
                             "slot (--text-pooling mean) and rich captions (--captions rich)")
        feats, labels = caption_set.feats[:, 0], caption_set.labels
    return model.init_from(src, feats, labels, fit_steps)


def class_accuracy(pipe, per_class: int, batch: int = 100) -> Optional[dict]:
    """Fraction of samples the shipped Fashion-MNIST classifier assigns to the requested class
    (t2i: prompts cycle through the held-out `HELDOUT_PROMPTS`). None when no classifier is installed."""
    try:
        from ..eval.fmnist_classifier import load_fmnist_classifier

        clf = load_fmnist_classifier()
    except Exception:  # noqa: BLE001 - optional: the classifier ships separately
        return None
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    correct = torch.zeros(len(CLASS_NAMES))
    seeds = list(range(10_000, 10_000 + len(labels)))
    for s in range(0, len(labels), batch):
        lab = labels[s:s + batch]
        prompts = None
        if pipe.is_text_to_image:
            prompts = [captions_mod.HELDOUT_PROMPTS[int(c)][(s + j) % len(captions_mod.HELDOUT_PROMPTS[int(c)])]
                       for j, c in enumerate(lab)]
        imgs = sample_grid(pipe, lab, prompts, seeds=seeds[s:s + batch])
        with torch.no_grad():
            pred = clf(imgs).argmax(-1)
        correct += torch.bincount(lab[pred == lab], minlength=len(CLASS_NAMES)).float()
    return {"accuracy": float(correct.sum() / len(labels)), "per_class": (correct / per_class).tolist(),
            "samples": len(labels), "cfg_scale": pipe.defaults["cfg_scale"],
            "conditions": "held-out prompts (HELDOUT_PROMPTS)" if pipe.is_text_to_image else "class ids",
            "classifier": "argen/assets/fmnist-classifier"}


def _json(data) -> str:
    import json

    return json.dumps(data, indent=1) + "\n"


def _conditions(model_type, labels, encoder, images, caption_set):
    if model_type == "c2i":
        return labels, None
    texts = [caption_set.caption(0, i, int(labels[i]), images[i].numpy()) for i in range(len(labels))]
    return _encode_all(encoder, texts)


def _block_width(g: dict) -> str:
    hidden = g.get("shuffle_mlp_hidden")
    kind = "plain MLP (x + W2 silu(W1 x))" if g.get("shuffle_mlp_kind") == "plain" else "SwiGLU"
    return f", {kind} hidden width {hidden}" if hidden else ""


def _check_shuffle(shuffle, grid) -> None:
    """One line for a window side the tokenizer's grid cannot take (before the codes are encoded)."""
    from ..checks import check_number

    s = check_number("shuffle", shuffle, 1, None, integer=True)
    if grid is None:
        raise ArgenError("--shuffle needs a tokenizer with a 2D code grid; this one makes 1D codes")
    if grid[0] % s or grid[1] % s:
        raise ArgenError(f"--shuffle {s} does not divide the tokenizer's {grid[0]}x{grid[1]} code grid")


@torch.no_grad()
def _test_loss(model: GPT, codes, cond, mask, batch_size: int = 250) -> float:
    model.eval()
    total = 0.0
    for s in range(0, len(codes), batch_size):
        x = codes[s:s + batch_size]
        c = cond[s:s + batch_size]
        mk = None if mask is None else mask[s:s + batch_size]
        total += float(model.loss(x, c, mk)) * x.numel()
    return total / codes.numel()


def write_gpt_card(folder: Path, metrics: dict, cfg: TrainConfig, run_info: dict, pipeline: dict) -> None:
    g = run_info["gpt_config"]
    kind = run_info["kind"].split("-")[1]
    epochs = metrics["step"] * cfg.batch_size / run_info["train_items"]
    tokens = metrics["step"] * cfg.batch_size * g["block_size"]
    title = "class-conditional (c2i)" if kind == "c2i" else "text-conditional (t2i, MiniLM caption features)"
    cond_text = (
        "Condition: Fashion-MNIST class id 0-9 (" + ", ".join(f"{i}={n}" for i, n in enumerate(CLASS_NAMES)) + "); "
        f"class dropout {g['class_dropout_prob']} during training gives the null class used by CFG."
        if kind == "c2i" else _t2i_condition_text(g, run_info)
    )
    grid = ("`samples.png`: one row per class (0-9 top to bottom), "
            f"{cfg_scale_text(pipeline)}, seeds 0..{metrics['grid_samples'] - 1} in reading order.")
    if metrics.get("grid_prompts"):
        grid += " Row prompts (held-out): " + "; ".join(f"{i}: \"{p}\"" for i, p in enumerate(metrics["grid_prompts"]))
    one_d = g.get("rope_type") == "1d"
    side = int(round(g["block_size"] ** 0.5))
    layout = (f"{g['block_size']} 1D tokens per image (no grid)" if one_d else
              f"{side}x{side} = {g['block_size']} codes per image" if not g.get("grid_size") else
              f"{g['grid_size'][0]}x{g['grid_size'][1]} = {g['block_size']} codes per image")
    s = g.get("shuffle")
    cfg_cls = GPTConfig if s is None else TokenShuffleConfig
    arch = ("" if s is None else
            f"\n- Token-Shuffle: s = {s}, each {s}x{s} window of codes is one transformer position "
            f"({g['block_size'] // (s * s)} positions, {s * s} codes each), {g['shuffle_mlp_blocks']} residual MLP "
            f"block(s) on each side{_block_width(g)} (`argen.models.TokenShuffleGPT`).")
    name = Path(folder).name if Path(folder).name != "model" else f"{kind} model"
    text = f"""# {name}: {title} GPT for Fashion-MNIST

LlamaGen-architecture generator (`argen.models.{'GPT' if s is None else 'TokenShuffleGPT'}`) trained {"from `" + str(run_info["init_from"]) + "`" if run_info.get("init_from") else "from scratch"} with `argen train gpt` on the
tokenizer codes of the Fashion-MNIST train split ({run_info['train_items']} items{', incl. horizontal flips' if run_info['flip'] else ''}),
tokenizer `{pipeline['tokenizer']}` ({layout}, vocabulary {g['vocab_size']}).

## Model
- dim {g['dim']}, {g['n_layer']} layers, {g['n_head']} heads, FFN hidden {cfg_cls.from_dict(g).ffn_hidden_dim},
  {'1D' if one_d else '2D'} RoPE, {run_info['parameters'] / 1e6:.2f}M parameters; dropout (token/residual/FFN) {g['resid_dropout_p']}.{arch}
- {cond_text}
- Weights: EMA (decay {cfg.ema_decay}) of the trained weights, stored as {metrics['export_dtype']}
  (teacher-forced test loss fp32 EMA {metrics['test_loss_ema_fp32']:.4f}"""
    if "test_loss_fp16_export" in metrics:
        text += f", fp16 export {metrics['test_loss_fp16_export']:.4f}"
    text += f""").
- `pipeline.json` names the tokenizer, model type, class names{' and text encoder' if kind == 't2i' else ''}.

## Training
- Command: `{run_info.get('command') or 'see train_config in metrics.json'}`
- Seed {cfg.seed}; {metrics['step']} steps of batch {cfg.batch_size} ({epochs:.2f} epochs, {tokens / 1e6:.1f}M training tokens);
  AdamW lr {cfg.lr}, betas {tuple(cfg.betas)}, weight decay {cfg.weight_decay} on matrices, {cfg.warmup_steps} warmup steps
  then cosine to {cfg.min_lr_ratio} x lr, grad clip {cfg.grad_clip}; {_objective_text(run_info, g)}.
- Wall time: {metrics['train_wall_s'] / 60:.1f} min of training on this machine's CPU (2 cores, shared with other jobs;
  {run_info.get('threads', '?')} torch thread(s)),
  plus {metrics['prep_s']:.0f} s to encode the data{' and captions' if kind == 't2i' else ''}.
- Final training loss (mean of the last log interval): {metrics['final_train_losses'].get('loss', float('nan')):.4f};
  teacher-forced loss on {metrics['test_items']} test images: {metrics['test_loss_ema_fp32']:.4f} nats/token.

## Samples
{grid}
{_accuracy_text(metrics.get('class_accuracy'))}

## Use
```python
from argen.pipeline import ARPipeline
pipe = ARPipeline.from_pretrained("<this folder or its shipped name>")
```
"""
    atomic_write_text(folder / "MODEL_CARD.md", text)


def _objective_text(run_info: dict, g: dict) -> str:
    distill = run_info.get("distill")
    if not distill:
        return f"cross-entropy over all {g['block_size']} tokens"
    return (f"distilled from `{distill['from']}`: KL divergence from its guided next-token distribution (CFG "
            f"{distill['cfg_scale']}) to this model's at the same guidance, over all {g['block_size']} tokens "
            "(`argen.train.gpt.distill_loss`; the training loss below is that KL)")


def _t2i_condition_text(g: dict, run_info: dict) -> str:
    encoder = run_info.get("text_encoder") or {}
    if encoder.get("pooling") == "mean":
        features = (f"all-MiniLM-L6-v2 sentence embedding (mean of the token features over up to "
                    f"{encoder.get('max_length')} tokens, L2-normalised, scaled to unit RMS): one condition slot x "
                    f"{g['caption_dim']}")
    else:
        features = f"all-MiniLM-L6-v2 token features ({g['cls_token_num']} left-padded slots x {g['caption_dim']})"
    if run_info.get("captions") == "rich":
        captions = ("Training captions: a fixed pool of rich captions per class and measured shade "
                    "(`argen.data.captions.rich_caption_pool`: everyday names in singular and plural, colours, "
                    "patterns, materials, details, occasions and neutral distractor words in 20 frames)")
    else:
        captions = ("Training captions come from `argen.data.captions.train_caption` (several templates, "
                    "synonyms and a measured dark/light attribute)")
    text = (f"Condition: {features}, see `text_encoder.json`. {captions}, redrawn every epoch; caption dropout "
            f"{g['class_dropout_prob']} trains the unconditional embedding used by CFG. Evaluation prompts "
            "(`HELDOUT_PROMPTS` and `argen/data/prompts_heldout.jsonl`) were never trained on.")
    if run_info.get("init_from"):
        text += (f" Started from `{run_info['init_from']}`: its weights were copied"
                 + (" and the caption projection was first fitted to map each training caption onto its class's "
                    f"embedding (mean squared error {run_info['init']['caption_fit_mse']:.4f})"
                    if (run_info.get("init") or {}).get("caption_fit_mse") is not None else "") + ".")
    return text


def _accuracy_text(acc: Optional[dict]) -> str:
    if not acc:
        return ""
    per = ", ".join(f"{n} {100 * a:.0f}%" for n, a in zip(CLASS_NAMES, acc["per_class"]))
    return (f"\nClass accuracy of {acc['samples']} samples ({acc['conditions']}, CFG {acc['cfg_scale']}, seeds 10000+) "
            f"under the shipped Fashion-MNIST classifier: **{100 * acc['accuracy']:.1f}%** ({per}).\n")


def cfg_scale_text(pipeline: dict) -> str:
    return f"CFG scale {pipeline['defaults']['cfg_scale']}"
