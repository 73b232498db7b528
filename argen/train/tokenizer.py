"""Tokenizer training on Fashion-MNIST (`argen train tokenizer`): the LlamaGen VQ (`--arch vq`, the
default), TiTok (`--arch titok`, K 1D tokens) or FlexTok (`--arch flextok`, 1..K ordered 1D tokens).

Losses as LlamaGen's `vq_train.py` minus the parts that need pretrained networks: L2
reconstruction (optionally + L1), codebook loss and commitment loss (beta 0.25, from the
model config). LPIPS needs VGG weights that cannot be fetched here, so there is no perceptual
loss. The adversarial loss is an option (`gan_weight` > 0): a PatchGAN discriminator trained from scratch
with the hinge loss, the generator's term scaled by VQGAN's adaptive weight, from step `gan_start`
on (`argen/train/gan.py`). It judges VQ's and TiTok's reconstructions, and FlexTok's
`last_step_images` (a flow decoder has no one-pass reconstruction: the stored decoding's last
Euler step, taken from the true noisy image, is where its output is formed).

`decoder_only` (TiTok's stage 2: decoder fine-tuning) freezes the encoder and the codebook: every
image keeps its codes, so generators trained on them stay valid, and no gradient flows through
the encoder. Dead-code restarts are then off (the codebook does not move).

Dead-code restarts (on by default): every `restart_every` steps, codes no batch picked since the
last check are moved onto randomly chosen encoder outputs of the current batch. A small
L2-normalised codebook otherwise leaves many entries stranded far from the data, and every dead
code is vocabulary the GPT cannot use. Restarts stop at `restart_until` (fraction of the run) so
the codebook settles before the end.

TiTok (`--arch titok`): single stage, directly on pixels, the RGB head (`is_legacy=False`), as the
official single-stage recipe minus its perceptual loss (same reason as above) and, unless `gan_weight`, its GAN; the same
losses, L2-normalised codebook, dead-code restarts, EMA and evaluation as the VQ. Images are the
28x28 garments padded to 32x32 like the VQ's, so both tokenizers see the same pixels, PSNR and
rFID are measured on the same frames, and `argen train gpt` / the pipeline's 28-pixel crop work
unchanged; the patch size (default 4) then gives an 8x8 patch grid.

FlexTok (`--arch flextok`): the model's own objective (`FlexTokTokenizer.forward`): FSQ codes (no
codebook or commitment loss, no dead codes to restart), nested dropout over the registers, and the
rectified-flow velocity loss of the decoder. Same 32x32 frames, EMA, evaluation (decoded with the
model's stored flow steps, test image i from seed i) and export; the model card adds a grid of
prefix decodes (k = 1, 2, 4, ..., K).

At the end the EMA weights are evaluated on the test split (PSNR, codebook usage, and with
`rfid=True` the reconstruction FID in Fashion-MNIST-classifier features) and exported.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..imageio import save_grey_figure
from ..data.fashion_mnist import load_fashion_mnist, pad_image, to_model_range
from ..errors import ArgenError
from ..tokenizers.flextok import FlexTokTokenizer, powers_of_two
from ..tokenizers.titok import TiTokTokenizer
from ..tokenizers.vq import VQTokenizer
from .common import (Trainer, TrainConfig, check_batch_size, check_run_args, check_trainable_size, set_threads,
                     seed_everything, write_json)
from .gan import AdversarialLoss, decoder_last_layer
from .rundir import check_run_dir, claim_run_dir, list_in_marker

DEFAULT_VQ = dict(codebook_size=1024, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                  commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=(1, 1, 2),
                  decoder_ch_mult=(1, 1, 2), z_channels=64, dropout_p=0.0, ch=32, num_res_blocks=1,
                  in_channels=1, norm_groups=16, image_size=32)

# TiTok defaults for Fashion-MNIST (argen train tokenizer --arch titok); sized for a < 40 min CPU run.
DEFAULT_TITOK = dict(num_latent_tokens=16, patch_size=4, width=96, enc_layers=3, dec_layers=4, heads=4)

# FlexTok defaults (argen train tokenizer --arch flextok); sized for a ~45 min run on one CPU thread.
DEFAULT_FLEXTOK = dict(num_latent_tokens=32, patch_size=4, width=128, enc_layers=4, dec_layers=4, heads=4,
                       fsq_levels=(8, 5, 5, 5), flow_steps=8, decoder_guidance=1.0, cfg_dropout=0.1,
                       nested_dropout="pow2", nested_full_share=0.0, time_mean=0.0)

IMAGE_SIZE = 32  # 28x28 Fashion-MNIST padded with background (-1) to 32x32 -> 8x8 codes with ch_mult (1,2,2)


class ImageBatches:
    """Fashion-MNIST images as a batchable source: keys (epoch, index) -> [B, 1, 32, 32] in [-1, 1]."""

    def __init__(self, images_uint8: torch.Tensor, pad_to: int = IMAGE_SIZE):
        self.images = images_uint8
        self.pad_to = pad_to

    def __len__(self):
        return len(self.images)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        return pad_image(to_model_range(self.images[index]).unsqueeze(1), self.pad_to)

    def __getitems__(self, keys):
        return {"image": self.batch(torch.tensor([i for _, i in keys], dtype=torch.long))}


def psnr_per_image(recon: torch.Tensor, target: torch.Tensor, crop: Optional[int] = None) -> torch.Tensor:
    """PSNR (dB) of each image, with both mapped from [-1, 1] to [0, 1]; `crop` keeps the central crop."""
    if crop is not None:
        off = (target.shape[-1] - crop) // 2
        recon = recon[..., off:off + crop, off:off + crop]
        target = target[..., off:off + crop, off:off + crop]
    r = (recon.clamp(-1, 1) + 1) / 2
    t = (target + 1) / 2
    mse = ((r - t) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def evaluate_tokenizer(vq, images_uint8: torch.Tensor, batch_size: int = 500, labels: Optional[torch.Tensor] = None,
                       rfid: bool = False, num_tokens: Optional[int] = None, seed: int = 0) -> dict:
    """Test-split metrics of any `ImageTokenizer` on 32x32 padded images: PSNR on the 28x28 garment
    area and on the padded 32x32 frame, codebook usage (fraction of entries used at least once) and
    code perplexity. With `rfid`: the reconstruction FID, i.e. the FID (Fashion-MNIST-classifier
    features, as `argen eval fid`) of the reconstructed 28x28 garment areas against the statistics
    of the real test split, and (with `labels`) the classifier's accuracy on the reconstructions.
    `num_tokens` k: decode only the first k codes of each image (tokenizers with `accepts_prefixes`);
    usage then counts those. Test image i decodes with seed `seed` + i (random decoders such as
    FlexTok's: another `seed` measures how much the figures move with the decoder's noise alone)."""
    vq.eval()
    if num_tokens is not None and num_tokens != vq.num_tokens:
        if not getattr(vq, "accepts_prefixes", False):
            raise ArgenError(f"{type(vq).__name__} decodes only complete sequences of {vq.num_tokens} codes")
        if not 1 <= num_tokens <= vq.num_tokens:
            raise ArgenError(f"num_tokens must be in 1..{vq.num_tokens}, got {num_tokens}")
    source = ImageBatches(images_uint8)
    psnr28, psnr32, counts = [], [], torch.zeros(vq.vocab_size, dtype=torch.float64)
    mse_sum = 0.0
    crops = []
    for start in range(0, len(source), batch_size):
        x = source.batch(torch.arange(start, min(start + batch_size, len(source))))
        codes = vq.encode(x)
        if num_tokens is not None:
            codes = codes.flatten(1)[:, :num_tokens]
        recon = vq.decode(codes, seeds=list(range(seed + start, seed + start + len(x)))).float()
        psnr28.append(psnr_per_image(recon, x, crop=28))
        psnr32.append(psnr_per_image(recon, x))
        counts += torch.bincount(codes.flatten(), minlength=vq.vocab_size).double()
        mse_sum += float(((recon.clamp(-1, 1) - x) ** 2).mean()) * len(x)
        if rfid:
            off = (IMAGE_SIZE - 28) // 2
            crops.append(recon.clamp(-1, 1)[..., off:off + 28, off:off + 28])
    p = counts / counts.sum()
    nz = p[p > 0]
    extra = {}
    if rfid:
        from ..eval.quality import quality_scorer

        score = quality_scorer(len(source), floor=False)
        m = score(torch.cat(crops), None if labels is None else [int(v) for v in labels[:len(source)]])
        extra = {"rfid": m["fid"], "recon_class_accuracy": m["class_accuracy"],
                 "rfid_protocol": "fmnist-classifier features of the reconstructed 28x28 test images vs "
                                  "the fashion-mnist:test reference statistics"}
    return {
        "test_images": len(source),
        **({} if num_tokens is None else {"num_tokens": num_tokens}),
        "psnr_db": float(torch.cat(psnr28).mean()),
        "psnr_32x32_db": float(torch.cat(psnr32).mean()),
        "mse_32x32_in_[-1,1]": mse_sum / len(source),
        "codebook_usage": float((counts > 0).float().mean()),
        "codes_used": int((counts > 0).sum()),
        "codebook_size": vq.vocab_size,
        "code_perplexity": float(torch.exp(-(nz * nz.log()).sum())),
        **extra,
    }


class CodeRestarter:
    """Dead-code restarts (see module docstring). Its counters live in the trainer's extra_state
    so they are checkpointed; it draws randomness from the global torch RNG (also checkpointed)."""

    def __init__(self, every: int, until_step: int, counts: torch.Tensor):
        self.every = every
        self.until_step = until_step
        self.counts = counts
        self.restarted = 0

    def __call__(self, trainer: Trainer, batch, aux) -> None:
        indices, z = aux
        self.counts += torch.bincount(indices.flatten(), minlength=self.counts.numel()).to(self.counts)
        if not self.every or trainer.step % self.every or trainer.step > self.until_step:
            return
        acc = trainer.accelerator
        counts = acc.reduce(self.counts.clone(), reduction="sum") if acc.num_processes > 1 else self.counts
        dead = (counts == 0).nonzero().flatten()
        self.counts.zero_()
        if dead.numel() == 0:
            return
        pool = z.reshape(-1, z.shape[-1]).detach()
        pick = torch.randint(0, pool.shape[0], (dead.numel(),))
        new = F.normalize(pool[pick] + 0.01 * torch.randn(dead.numel(), pool.shape[1]), dim=-1)  # both codebooks are L2-normalised
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            new = broadcast(new.contiguous())
        vq = trainer.unwrapped
        emb = vq.quantize.embedding.weight
        with torch.no_grad():
            emb[dead] = new.to(emb)
            state = trainer.optimizer.state.get(emb, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0
        self.restarted += dead.numel()


def _save_recon_grid(vq, images_uint8: torch.Tensor, path: Path, n: int = 16) -> None:
    """Rows: originals / reconstructions, 2 pairs of rows, for the model card."""
    n = max(1, min(n, len(images_uint8) // 2))
    x = ImageBatches(images_uint8).batch(torch.arange(2 * n))
    with torch.no_grad():
        recon = vq.decode(vq.encode(x)).float().clamp(-1, 1)
    rows = [x[:n], recon[:n], x[n:], recon[n:]]
    grid = torch.cat([torch.cat(list(r[:, 0]), dim=1) for r in rows], dim=0)
    save_grey_figure(grid, path)


def save_prefix_grid(tok, images_uint8: torch.Tensor, path: Path, n: int = 12) -> None:
    """FlexTok card figure: row 0 the originals, then one row per prefix length k = 1, 2, 4, ..., K."""
    n = max(1, min(n, len(images_uint8)))
    x = ImageBatches(images_uint8).batch(torch.arange(n))
    rows = [x]
    with torch.no_grad():
        codes = tok.encode(x)
        for k in powers_of_two(tok.num_tokens):
            rows.append(tok.decode(codes[:, :k], seeds=list(range(n))).float().clamp(-1, 1))
    grid = torch.cat([torch.cat(list(r[:, 0]), dim=1) for r in rows], dim=0)
    save_grey_figure(grid, path)


def titok_kwargs(*, num_latent_tokens: int, patch_size: int, width: int, enc_layers: int, dec_layers: int,
                 heads: int, codebook_size: int, codebook_dim: int) -> dict:
    """`TiTokTokenizer` arguments for a Fashion-MNIST TiTok (1 channel, 32x32, RGB head, cosine codebook)."""
    if IMAGE_SIZE % patch_size:
        raise ArgenError(f"--patch-size {patch_size} does not divide the {IMAGE_SIZE}x{IMAGE_SIZE} training images")
    if width % heads:
        raise ArgenError(f"--width {width} is not divisible by --heads {heads}")
    return dict(image_size=IMAGE_SIZE, in_channels=1, num_latent_tokens=num_latent_tokens,
                codebook_size=codebook_size, token_size=codebook_dim, use_l2_norm=True, commitment_cost=0.25,
                enc_patch_size=patch_size, enc_width=width, enc_layers=enc_layers, enc_heads=heads,
                dec_patch_size=patch_size, dec_width=width, dec_layers=dec_layers, dec_heads=heads,
                is_legacy=False, finetune_decoder=False)


def flextok_kwargs(*, num_latent_tokens: int, patch_size: int, width: int, enc_layers: int, dec_layers: int,
                   heads: int, fsq_levels: Sequence[int], flow_steps: int, decoder_guidance: float,
                   cfg_dropout: float, nested_dropout: str, nested_full_share: float, time_mean: float) -> dict:
    """`FlexTokTokenizer` arguments for Fashion-MNIST (1 channel, 32x32 frames, same width both sides)."""
    if IMAGE_SIZE % patch_size:
        raise ArgenError(f"--patch-size {patch_size} does not divide the {IMAGE_SIZE}x{IMAGE_SIZE} training images")
    if width % heads:
        raise ArgenError(f"--width {width} is not divisible by --heads {heads}")
    if not fsq_levels or min(fsq_levels) < 3:
        raise ArgenError(f"--fsq-levels {','.join(map(str, fsq_levels))}: every FSQ level must be >= 3 "
                         "(fsq_levels; vector-quantize-pytorch's FSQ needs its symmetric variant for 2)")
    return dict(image_size=IMAGE_SIZE, in_channels=1, patch_size=patch_size, num_registers=num_latent_tokens,
                fsq_levels=tuple(int(v) for v in fsq_levels), enc_width=width, enc_layers=enc_layers,
                enc_heads=heads, dec_width=width, dec_layers=dec_layers, dec_heads=heads,
                nested_dropout=nested_dropout, nested_full_share=float(nested_full_share), cfg_dropout=cfg_dropout,
                flow_steps=flow_steps, guidance_scale=float(decoder_guidance), time_mean=float(time_mean))


# FSQ bounds each latent with tanh before rounding; beyond |z| = 2 the slope tanh' is below 0.07, so
# a latent out there stays on its extreme level whatever the loss wants (see fsq_saturation).
FSQ_ACTIVE_RANGE = 2.0


def fsq_saturation(latent: torch.Tensor) -> torch.Tensor:
    """mean(relu(|z| - 2)^2) over the registers before FSQ: zero inside the range where tanh still has a
    slope, growing outside it. Measured on FlexTok (docs/history/flextok.md): without it, 85% of the latents
    were past |z| = 2 after 200 steps (81% after 850), most codes pinned to the extreme levels of
    each dimension, 43 of 1,000 codes in use."""
    return F.relu(latent.abs() - FSQ_ACTIVE_RANGE).pow(2).mean()


def _no_decay(name: str) -> bool:
    """TiTok / FlexTok: no weight decay on the codebook, the learned tokens and the positional embeddings."""
    return name.startswith("quantize.") or name in ("latent_tokens", "registers") or name.rsplit(".", 1)[-1] in (
        "class_embedding", "positional_embedding", "latent_token_positional_embedding", "mask_token",
        "enc_pos", "dec_patch_pos", "dec_register_pos")


def _latents_for_restart(model, x: torch.Tensor) -> torch.Tensor:
    """Encoder outputs before quantisation as [..., codebook_dim] rows (restart candidates)."""
    if isinstance(model, TiTokTokenizer):
        z = model.encode_latent((x + 1) / 2)  # [B, C, 1, K] on TiTok's [0, 1] pixels
        return z[:, :, 0].permute(0, 2, 1)  # [B, K, C]
    return model.encode_latent(x).permute(0, 2, 3, 1)


# Config keys a warm start (`init_from`) may change: decoding defaults and training-only settings.
# Every other key decides the weights' shapes or their meaning (e.g. FSQ levels of the same count).
INIT_FREE_KEYS = ("flow_steps", "guidance_scale", "guidance_start", "time_mean", "cfg_dropout", "nested_dropout",
                  "nested_full_share")


def freeze_all_but_decoder(model) -> int:
    """`decoder_only`: freeze everything but the parameters on the decoding side of the codes (the
    class's `decoder_param_prefixes`): encoder, latent tokens and codebook stay; returns the
    trainable count."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(model.decoder_param_prefixes))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def init_tokenizer_weights(model, source) -> dict:
    """Copy into `model` the weights of the tokenizer `source` (shipped name or folder), which must be
    of the same class and architecture (its config equal but for `INIT_FREE_KEYS`). Returns what
    was copied from where, for the run record."""
    import json

    from ..hub import resolve_model_dir

    try:
        folder = resolve_model_dir(source)
    except ArgenError as err:
        raise ArgenError(f"--init-from: {err}") from None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ArgenError(f"--init-from {source}: no readable config.json in {folder} ({err})") from None
    if config.get("_class_name") != type(model).__name__:
        raise ArgenError(f"--init-from {source}: it is a {config.get('_class_name')}, this run trains a "
                         f"{type(model).__name__}")
    mine = json.loads(json.dumps(dict(model.config), default=list))
    growable = getattr(model, "growable_blocks", {})
    grown = {k: (config[k], mine[k]) for k in growable
             if isinstance(config.get(k), int) and config[k] < mine[k]}
    differ = sorted(k for k in mine if not k.startswith("_") and k not in INIT_FREE_KEYS and k not in grown
                    and config.get(k) != mine[k])
    if differ:
        raise ArgenError(f"--init-from {source}: its architecture differs from this run's in "
                         + ", ".join(f"{k} ({config.get(k)!r} vs {mine[k]!r})" for k in differ))
    state = type(model).from_pretrained(folder).float().state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_blocks = tuple(f"{growable[k]}{i}." for k, (old, new) in grown.items() for i in range(old, new))
    if unexpected or any(not name.startswith(new_blocks) for name in missing):
        raise ArgenError(f"--init-from {source}: weights do not fit this run ({len(unexpected)} unexpected, "
                         f"{len(missing)} missing)")
    info = {"folder": str(folder), "tensors": len(state)}
    if grown:
        info["grown"] = {k: list(v) for k, v in grown.items()}  # new blocks start as the identity
    return info


def train_tokenizer(out, *, steps: Optional[int] = None, epochs: Optional[float] = None, batch_size: int = 64,
                    lr: float = 5e-4, seed: int = 0, warmup_steps: int = 200, weight_decay: float = 0.05,
                    ema_decay: float = 0.999, grad_clip: float = 1.0, ch: int = DEFAULT_VQ["ch"],
                    ch_mult: Sequence[int] = DEFAULT_VQ["encoder_ch_mult"],
                    num_res_blocks: int = DEFAULT_VQ["num_res_blocks"], z_channels: int = DEFAULT_VQ["z_channels"],
                    codebook_size: int = DEFAULT_VQ["codebook_size"],
                    codebook_dim: int = DEFAULT_VQ["codebook_embed_dim"], norm_groups: Optional[int] = None,
                    l1_weight: float = 0.0, restart_every: int = 100, restart_until: float = 0.8,
                    limit: Optional[int] = None, test_limit: Optional[int] = None, ckpt_every: int = 500,
                    log_every: int = 25, resume: bool = False, threads: Optional[int] = None,
                    progress: bool = True, export_dtype: str = "auto", command: Optional[str] = None,
                    data_root=None, stop_at_step: Optional[int] = None, arch: str = "vq",
                    num_latent_tokens: Optional[int] = None, patch_size: Optional[int] = None,
                    width: Optional[int] = None, enc_layers: Optional[int] = None, dec_layers: Optional[int] = None,
                    heads: Optional[int] = None, fsq_levels: Optional[Sequence[int]] = None,
                    flow_steps: Optional[int] = None, decoder_guidance: Optional[float] = None,
                    cfg_dropout: Optional[float] = None,
                    nested_dropout: Optional[str] = None, nested_full_share: Optional[float] = None,
                    time_mean: Optional[float] = None, rfid: bool = False, init_from: Optional[str] = None,
                    fsq_saturation_weight: Optional[float] = None, gan_weight: float = 0.0,
                    gan_start: Optional[int] = None, decoder_only: bool = False) -> dict:
    """Train a tokenizer; write `<out>/model` (EMA weights) and `<out>/metrics.json`. Returns the metrics.

    `arch`: "vq" (LlamaGen VQ: `ch`, `ch_mult`, `num_res_blocks`, `z_channels`, `norm_groups`) or
    "titok" (TiTok, RGB head, single stage: `num_latent_tokens` K, `patch_size`, `width`,
    `enc_layers`, `dec_layers`, `heads`; defaults `DEFAULT_TITOK`) or "flextok" (the same six, K being
    the register count, plus `fsq_levels`, `flow_steps` and `decoder_guidance` (decoding defaults), `cfg_dropout`,
    `nested_dropout`, `nested_full_share` (the share of images that keep all K), and the training-only
    `fsq_saturation_weight` (`fsq_saturation`); defaults `DEFAULT_FLEXTOK`). VQ and TiTok: `codebook_size`,
    `codebook_dim` (TiTok's token_size; the codebook is L2-normalised, cosine lookup, as the original TiTok's 4096 x 12);
    FlexTok's vocabulary is the product of its FSQ levels.
    `export_dtype`: "float16", "float32" or "auto" (float16 unless it costs > 0.05 dB test PSNR
    or changes codebook usage by more than 1 point). `rfid`: also measure the reconstruction FID
    of the exported weights on the test split (Fashion-MNIST-classifier features). `init_from`: start
    from the weights of that tokenizer (same class and architecture; `init_tokenizer_weights`)
    instead of a random initialisation; optimizer, schedule and EMA start afresh.
    `gan_weight` > 0: add the adversarial loss (`argen/train/gan.py`) from step `gan_start`
    (default 0) on, on the reconstructions (VQ, TiTok) or on FlexTok's `last_step_images`; 0 trains
    exactly as without it. `decoder_only`: train the decoder
    only (encoder and codebook frozen, so the codes do not change; restarts off).
    """
    from ..distributed import make_accelerator

    set_threads(threads)
    check_run_args(steps, epochs, export_dtype, limit=limit, test_limit=test_limit)
    check_run_dir(out, resume)
    if arch not in ("vq", "titok", "flextok"):
        raise ArgenError(f"unknown tokenizer architecture {arch!r}: use vq, titok or flextok")
    if arch != "flextok" and any(v is not None for v in (fsq_levels, flow_steps, decoder_guidance, cfg_dropout,
                                                         nested_dropout, nested_full_share, time_mean,
                                                         fsq_saturation_weight)):
        raise ArgenError("fsq_levels, flow_steps, decoder_guidance, cfg_dropout, nested_dropout, nested_full_share, "
                         "time_mean and fsq_saturation_weight apply to arch flextok only")
    if fsq_saturation_weight is not None and not fsq_saturation_weight >= 0:
        raise ArgenError(f"fsq_saturation_weight must be >= 0, got {fsq_saturation_weight}")
    saturation_weight = float(fsq_saturation_weight or 0.0)
    if not gan_weight >= 0:
        raise ArgenError(f"gan_weight must be >= 0, got {gan_weight}")
    if decoder_only and init_from is None:
        raise ArgenError("decoder-only training needs a starting tokenizer (--init-from): its encoder and codes "
                         "are what the run keeps")
    if gan_start is not None and not gan_weight:
        raise ArgenError("gan_start needs gan_weight > 0 (--gan-weight)")
    gan_start = int(gan_start or 0)
    if gan_start < 0:
        raise ArgenError(f"gan_start must be >= 0, got {gan_start}")
    sizes = dict(num_latent_tokens=num_latent_tokens, patch_size=patch_size, width=width, enc_layers=enc_layers,
                 dec_layers=dec_layers, heads=heads)
    if arch != "vq":
        defaults = DEFAULT_TITOK if arch == "titok" else DEFAULT_FLEXTOK
        sizes = {k: defaults[k] if v is None else v for k, v in sizes.items()}
    if arch == "vq":
        ch_mult = tuple(int(m) for m in ch_mult)
        if norm_groups is None:
            norm_groups = math.gcd(*[ch * m for m in ch_mult], 32)
        vq_kwargs = dict(DEFAULT_VQ, encoder_ch_mult=ch_mult, decoder_ch_mult=ch_mult, ch=ch,
                         num_res_blocks=num_res_blocks, z_channels=z_channels, codebook_size=codebook_size,
                         codebook_embed_dim=codebook_dim, norm_groups=norm_groups)
        if IMAGE_SIZE % 2 ** (len(ch_mult) - 1):
            raise ArgenError(f"ch_mult {ch_mult} downsamples {IMAGE_SIZE}x{IMAGE_SIZE} to a fractional grid")
        model_cls, config_key, kind = VQTokenizer, "vq_config", "vq-tokenizer"
    elif arch == "titok":
        vq_kwargs = titok_kwargs(**sizes, codebook_size=codebook_size, codebook_dim=codebook_dim)
        model_cls, config_key, kind = TiTokTokenizer, "titok_config", "titok-tokenizer"
    else:
        given = dict(fsq_levels=fsq_levels, flow_steps=flow_steps, decoder_guidance=decoder_guidance,
                     cfg_dropout=cfg_dropout,
                     nested_dropout=nested_dropout, nested_full_share=nested_full_share, time_mean=time_mean)
        vq_kwargs = flextok_kwargs(**sizes, **{k: DEFAULT_FLEXTOK[k] if v is None else v for k, v in given.items()})
        model_cls, config_key, kind = FlexTokTokenizer, "flextok_config", "flextok-tokenizer"
        codebook_size = math.prod(vq_kwargs["fsq_levels"])
        restart_every = 0  # FSQ has no codebook entries to move: every grid point is a code

    check_trainable_size(lambda: model_cls(**vq_kwargs), "this tokenizer")

    train_images, _ = load_fashion_mnist("train", data_root)
    test_images, test_labels = load_fashion_mnist("test", data_root)
    if limit is not None:
        train_images = train_images[:limit]
    if test_limit is not None:
        test_images, test_labels = test_images[:test_limit], test_labels[:test_limit]

    accelerator = make_accelerator()
    seed_everything(seed + accelerator.process_index)
    torch.manual_seed(seed)  # identical init on every process
    vq = model_cls(**vq_kwargs)
    # a warm start that does not fit is refused before the run folder is claimed: nothing is left behind
    init_info = init_tokenizer_weights(vq, init_from) if init_from is not None else None
    check_batch_size(len(train_images), batch_size)
    out = claim_run_dir(out, resume, accelerator.is_main_process)
    if epochs is not None:
        per_epoch = len(train_images) // (batch_size * accelerator.num_processes)
        steps = max(1, math.ceil(epochs * per_epoch))
    if gan_weight and gan_start >= steps:
        raise ArgenError(f"gan_start {gan_start} is not before the last step ({steps}): the GAN would never train")
    cfg = TrainConfig(out=str(out), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, ema_decay=ema_decay, grad_clip=grad_clip, seed=seed,
                      ckpt_every=ckpt_every, log_every=log_every, resume=resume, progress=progress)

    torch.manual_seed(seed + accelerator.process_index)
    if decoder_only:
        trainable = freeze_all_but_decoder(vq)
        restart_every = 0  # the codebook is frozen: nothing to restart
    gan = AdversarialLoss(gan_weight, gan_start, lr, seed + 1, in_channels=vq.image_channels,
                          accelerator=accelerator) if gan_weight else None
    counts = torch.zeros(codebook_size, dtype=torch.float64)
    restarter = CodeRestarter(restart_every, int(restart_until * steps), counts)
    run_info = {"kind": kind, config_key: {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in vq_kwargs.items()},
                "train_items": len(train_images), "l1_weight": l1_weight, "restart_every": restart_every,
                "restart_until": restart_until, "command": command, "threads": torch.get_num_threads(),
                "init_from": init_info}
    if arch == "flextok":
        run_info["fsq_saturation_weight"] = saturation_weight
    # Recorded only when on, so runs without them keep their record (and resume) as before.
    if gan is not None:
        run_info["gan"] = gan.describe()
    if decoder_only:
        run_info["decoder_only"] = {"trainable_parameters": trainable}

    def adversarial(loss, nll, real, fake):
        """`loss` plus the generator's adversarial term once the GAN is active (the discriminator
        first takes its step on this batch), and the GAN's log values; `loss` alone without a GAN."""
        if gan is None:
            return loss, {}
        if not gan.active(trainer.step):
            return loss, gan.idle_parts()
        parts = gan.discriminator_step(real, fake)
        term, generator_parts = gan.generator_term(fake, nll, decoder_last_layer(trainer.unwrapped))
        return loss + term, {**parts, **generator_parts}

    def flextok_loss(model, batch):
        x = batch["image"]
        out = model(x, last_step=gan is not None and gan.active(trainer.step))
        penalty = fsq_saturation(out.latent)
        loss = out.loss + saturation_weight * penalty if saturation_weight else out.loss
        # the flow loss is the decoder's reconstruction term: the adaptive weight balances against it
        loss, gan_parts = adversarial(loss, out.loss, x, out.last_step)
        used = torch.unique(out.codes).numel() / codebook_size
        parts = {"loss": loss, "flow": out.loss, "fsq_saturation": penalty,
                 "saturated": (out.latent.abs() > FSQ_ACTIVE_RANGE).float().mean(),
                 "batch_usage": torch.tensor(float(used)), "null_fraction": (out.keep == 0).float().mean(),
                 **gan_parts}
        return loss, parts, (out.codes, None)

    def loss_fn(model, batch):
        x = batch["image"]
        recon, codebook_loss, commit_loss, indices = model(x)
        rec = F.mse_loss(recon, x)
        loss = rec + codebook_loss + commit_loss
        nll = rec
        if l1_weight:
            l1 = l1_weight * (recon - x).abs().mean()
            loss, nll = loss + l1, rec + l1
        loss, gan_parts = adversarial(loss, nll, x, recon)
        with torch.no_grad():
            z = F.normalize(_latents_for_restart(trainer.unwrapped, x), dim=-1) if (
                restart_every and (trainer.step + 1) % restart_every == 0) else None
        used = torch.unique(indices).numel() / codebook_size
        parts = {"loss": loss, "rec_mse": rec, "codebook": codebook_loss, "commit": commit_loss,
                 "batch_usage": torch.tensor(float(used)), **gan_parts}
        return loss, parts, (indices, z)

    names = (["loss", "flow", "fsq_saturation", "saturated", "batch_usage", "null_fraction"] if arch == "flextok" else [
        "loss", "rec_mse", "codebook", "commit", "batch_usage"]) + (AdversarialLoss.LOG_NAMES if gan else [])
    trainer = Trainer(cfg, vq, ImageBatches(train_images), flextok_loss if arch == "flextok" else loss_fn,
                      num_items=len(train_images), loss_names=names,
                      extra_state={"code_counts": counts}, after_step=restarter, accelerator=accelerator,
                      run_info=run_info, tokens_per_item=0,
                      no_decay=_no_decay if arch != "vq" else (lambda name: name.startswith("quantize.")),
                      extra_modules={"discriminator": gan} if gan is not None else None)
    trainer.fit(stop_at=stop_at_step)
    if not trainer.finished:
        return {"stopped_at": trainer.step}
    t0 = time.time()
    metrics = {}
    if trainer.is_main:
        ema = trainer.ema_model()
        metrics = {"step": trainer.step, "train_wall_s": round(trainer.elapsed, 1),
                   "final_train_losses": trainer.last_losses}
        ema_metrics = evaluate_tokenizer(ema, test_images, labels=test_labels, rfid=rfid)
        # The raw (non-EMA) weights, on a subset, only to show what the EMA buys.
        metrics["test_raw_first_2000"] = evaluate_tokenizer(trainer.unwrapped.eval(), test_images[:2000])
        trainer.model.train()
        metrics["test_ema_fp32"] = ema_metrics
        folder = Path(out) / "model"
        final_metrics = ema_metrics
        if export_dtype == "float32":
            ema.save_pretrained(folder, dtype=torch.float32)
            dtype = torch.float32
        else:
            ema.save_pretrained(folder, dtype=torch.float16)
            dtype = torch.float16
            final_metrics = evaluate_tokenizer(model_cls.from_pretrained(folder).float(), test_images,
                                               labels=test_labels, rfid=rfid)
            metrics["test_fp16_export"] = final_metrics
            if export_dtype == "auto" and (ema_metrics["psnr_db"] - final_metrics["psnr_db"] > 0.05
                                           or abs(ema_metrics["codebook_usage"] - final_metrics["codebook_usage"]) > 0.01):
                ema.save_pretrained(folder, dtype=torch.float32)
                dtype, final_metrics = torch.float32, ema_metrics
        metrics["export_dtype"] = str(dtype).replace("torch.", "")
        metrics["test"] = final_metrics
        final = model_cls.from_pretrained(folder).float()
        metrics["parameters"] = sum(p.numel() for p in final.parameters())
        metrics["eval_wall_s"] = round(time.time() - t0, 1)
        _save_recon_grid(final, test_images, folder / "reconstructions.png")
        shown = ["reconstructions.png"]
        if arch == "flextok":
            save_prefix_grid(final, test_images, folder / "prefixes.png")
            shown.append("prefixes.png")
        write_json(Path(out) / "metrics.json", {**metrics, "train_config": cfg.to_dict(), "run": run_info})
        write_json(folder / "metrics.json", {**metrics, "train_config": cfg.to_dict(), "run": run_info})
        {"vq": write_tokenizer_card, "titok": write_titok_card, "flextok": write_flextok_card}[arch](
            folder, metrics, cfg, run_info)
        list_in_marker(folder, shown + ["metrics.json", "MODEL_CARD.md"])
    accelerator.wait_for_everyone()
    return metrics


def _rfid_line(test: dict, at: str = "") -> str:
    """The model card's reconstruction-FID line (runs with `--rfid`), or nothing; `at` qualifies it
    (FlexTok: "at k = 32", the prefix length it was measured at)."""
    if test.get("rfid") is None:
        return ""
    return (f"- Reconstruction FID{' ' + at if at else ''} (Fashion-MNIST-classifier features of the {test['test_images']:,} reconstructed 28x28 "
            f"test images vs the test split's statistics): **{test['rfid']:.2f}**; the classifier's accuracy on the "
            f"reconstructions {100 * test['recon_class_accuracy']:.1f}%.\n")


def _origin(run_info: dict) -> str:
    """How the cards' first paragraph says the weights started."""
    return "on top of an earlier run (a warm start, see Training)" if run_info.get("init_from") else "from scratch"


def _init_line(run_info: dict) -> str:
    """The model cards' line for a warm-started run (`init_from`), or nothing."""
    init = run_info.get("init_from")
    if not init:
        return ""
    grown = "; ".join(f"{key} {old} -> {new}, the new blocks starting as the identity"
                      for key, (old, new) in init.get("grown", {}).items())
    return (f"- Started from the weights of `{init['folder']}` ({grown or 'same architecture'}); optimizer, "
            "learning-rate schedule and EMA started afresh, so the steps below come on top of that run's.\n")


def _restart_text(run_info: dict, why: str = "") -> str:
    """The cards' words on dead-code restarts (none in a decoder-only run: the codebook is frozen)."""
    if run_info.get("decoder_only"):
        return "frozen in this run (decoder only), so no dead-code restarts"
    return (f"dead-code restarts every {run_info['restart_every']} steps until "
            f"{int(run_info['restart_until'] * 100)}% of training" + (f" {why}" if why else ""))


def _gan_lines(run_info: dict) -> str:
    """The cards' lines on the adversarial loss and decoder-only training, when the run had them."""
    text = ""
    gan = run_info.get("gan")
    if gan:
        text += (f"- Adversarial loss (`--gan-weight {gan['weight']:g}`, from step {gan['start']}): a PatchGAN discriminator "
                 f"({gan['disc_parameters']:,} parameters, {gan['disc_layers']} stride-2 layers from width "
                 f"{gan['disc_channels']}, GroupNorm) trained from scratch with the hinge loss (AdamW at the peak lr, "
                 f"betas {tuple(gan['disc_betas'])}); the generator adds {gan['weight']:g} x VQGAN's adaptive weight "
                 "(ratio of the reconstruction and adversarial gradient norms at the decoder's last layer) x "
                 "(-mean discriminator logit of its reconstructions). `argen/train/gan.py`.\n")
    if run_info.get("decoder_only"):
        text += (f"- Decoder only (`--train-decoder-only`): everything before the codes (encoder, latent tokens or "
                 "registers, codebook or FSQ projection) frozen "
                 f"({run_info['decoder_only']['trainable_parameters']:,} parameters trained), so every image keeps "
                 "the codes of the starting weights.\n")
    return text


def _full_share(config) -> str:
    share = config.get("nested_full_share", 0.0)
    return f", and all {config['num_registers']} on {share:.0%} of the images" if share else ""


def _saturation_line(run_info: dict) -> str:
    """FlexTok card: the FSQ saturation penalty of the run, when it had one."""
    weight = run_info.get("fsq_saturation_weight") or 0.0
    if not weight:
        return ""
    return (f"- Training adds {weight:g} x mean(relu(|z| - {FSQ_ACTIVE_RANGE:g})^2) on the latents before FSQ's tanh "
            "(`--fsq-saturation-weight`), so they stay where tanh has a slope and the codes can still move.\n")


def write_tokenizer_card(folder: Path, metrics: dict, cfg: TrainConfig, run_info: dict) -> None:
    vqc = run_info["vq_config"]
    test = metrics["test"]
    losses = metrics["final_train_losses"]
    factor = 2 ** (len(vqc["encoder_ch_mult"]) - 1)
    side = IMAGE_SIZE // factor
    # The grid is a design choice of each run; the reasoning below is the one behind default-vq's 8x8.
    why = ("""
  Why 8x8: the GPT's cost grows with the sequence length, and 64 tokens already means ~26 min per
  epoch for a 7M-parameter GPT on this CPU; 16x16 (256 tokens) would make every GPT epoch ~4x longer.
  Going down to 4x4 (16 tokens) would leave 16 codes of 10 bits for a whole garment, too few for
  textures and logos.""" if side == 8 else "")
    text = f"""# VQ tokenizer for Fashion-MNIST, {side}x{side} codes

LlamaGen-architecture VQ tokenizer (`argen.tokenizers.VQTokenizer`) trained {_origin(run_info)} on the
Fashion-MNIST train split (60,000 images) with `argen train tokenizer`.

## Design
- Input: 28x28 grey images padded with background (-1) to {IMAGE_SIZE}x{IMAGE_SIZE}, values in [-1, 1]
  (the 2-pixel border is plain background; {IMAGE_SIZE} is divisible by the downsampling factor {factor}).
- ch_mult {tuple(vqc['encoder_ch_mult'])} (downsample {factor}) -> {side}x{side} = {side * side} tokens per image,
  one code per {factor}x{factor} pixel patch.{why}
- ch {vqc['ch']}, {vqc['num_res_blocks']} res block(s) per level, z_channels {vqc['z_channels']}, GroupNorm groups {vqc['norm_groups']}.
  Sized so one training run fits the time budget on a 2-core CPU.
- Codebook {vqc['codebook_size']} x {vqc['codebook_embed_dim']}, L2-normalised (as LlamaGen); {_restart_text(run_info, "(codes unused since the last check are moved onto random encoder outputs) to keep codebook usage high")}.
- Losses: MSE reconstruction{' + %g L1' % run_info['l1_weight'] if run_info['l1_weight'] else ''} + codebook + commitment (beta {vqc['commit_loss_beta']}){' + adversarial' if run_info.get('gan') else ''}.
  No perceptual loss (LPIPS weights are not available offline){'' if run_info.get('gan') else '; no GAN loss'}.
{_gan_lines(run_info)}- Weights: EMA (decay {cfg.ema_decay}) of the trained weights, stored as {metrics['export_dtype']}.

## Training
- Command: `{run_info.get('command') or 'see train_config in metrics.json'}`
{_init_line(run_info)}- Seed {cfg.seed}; {metrics['step']} steps of batch {cfg.batch_size} (about {metrics['step'] * cfg.batch_size / run_info['train_items']:.2f} epochs);
  AdamW lr {cfg.lr} (betas {tuple(cfg.betas)}, weight decay {cfg.weight_decay}, none on the codebook), {cfg.warmup_steps} warmup steps then cosine
  to {cfg.min_lr_ratio} x lr; grad clip {cfg.grad_clip}.
- Wall time: {metrics['train_wall_s'] / 60:.1f} min of training on this machine's CPU (2 cores, shared with other jobs;
  {run_info.get('threads', '?')} torch thread(s)), plus {metrics['eval_wall_s'] / 60:.1f} min of evaluation and export.
- Final training losses (mean of the last log interval): """ + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) + f"""

## Quality (Fashion-MNIST test split, {test['test_images']} images, exported weights)
- PSNR {test['psnr_db']:.2f} dB on the 28x28 garment area ({test['psnr_32x32_db']:.2f} dB on the padded 32x32 frame);
  the reference to beat was 19.2 dB.
- Codebook usage {100 * test['codebook_usage']:.1f}% ({test['codes_used']} of {test['codebook_size']} codes used on the test split),
  code perplexity {test['code_perplexity']:.0f}.
{_rfid_line(test)}- Export check: EMA fp32 {metrics['test_ema_fp32']['psnr_db']:.3f} dB / usage {100 * metrics['test_ema_fp32']['codebook_usage']:.1f}%""" + (
        f"; fp16 export {metrics['test_fp16_export']['psnr_db']:.3f} dB / {100 * metrics['test_fp16_export']['codebook_usage']:.1f}%"
        if 'test_fp16_export' in metrics else "") + f""" (raw non-EMA weights on the first 2000 test images: {metrics['test_raw_first_2000']['psnr_db']:.2f} dB).
- `reconstructions.png`: rows 1/3 test originals, rows 2/4 their reconstructions.

## Use
```python
from argen.tokenizers.vq import VQTokenizer
vq = VQTokenizer.from_pretrained(folder)  # fp16 weights load into a float32 model
codes = vq.encode(images)   # [B, 1, 32, 32] in [-1, 1] -> [B, {side}, {side}]
images = vq.decode(codes)
```
"""
    atomic_write_text(folder / "MODEL_CARD.md", text)


def write_titok_card(folder: Path, metrics: dict, cfg: TrainConfig, run_info: dict) -> None:
    tc = run_info["titok_config"]
    test = metrics["test"]
    losses = metrics["final_train_losses"]
    k = tc["num_latent_tokens"]
    grid = IMAGE_SIZE // tc["enc_patch_size"]
    text = f"""# TiTok tokenizer for Fashion-MNIST, K = {k} 1D tokens

TiTok (`argen.tokenizers.TiTokTokenizer`, the official architecture with the RGB head, `is_legacy=False`)
trained {_origin(run_info)} on the Fashion-MNIST train split (60,000 images) with `argen train tokenizer --arch titok`.

## Design
- Input: 28x28 grey images padded with background to {IMAGE_SIZE}x{IMAGE_SIZE} (the same frames as `default-vq`),
  TiTok's [0, 1] range inside the tokenizer, argen's [-1, 1] outside.
- Encoder: {tc['enc_patch_size']}x{tc['enc_patch_size']} patches ({grid}x{grid} grid) + class token + {k} latent tokens, ViT width {tc['enc_width']},
  {tc['enc_layers']} layers, {tc['enc_heads']} heads; decoder: {grid * grid} mask tokens + the {k} projected codes, width {tc['dec_width']}, {tc['dec_layers']} layers,
  {tc['dec_heads']} heads, RGB head (1x1 conv to p*p pixels, unpatchify, 3x3 conv).
- Codebook {tc['codebook_size']} x {tc['token_size']}, L2-normalised (cosine lookup, as the original TiTok's 4096 x 12); {_restart_text(run_info)}.
- Single stage on pixels: MSE + codebook + commitment ({tc['commitment_cost']}){' + adversarial' if run_info.get('gan') else ''}. No perceptual loss (no pretrained
  networks offline){'' if run_info.get('gan') else ', no GAN loss'}, no proxy codes.
{_gan_lines(run_info)}- Weights: EMA (decay {cfg.ema_decay}), stored as {metrics['export_dtype']}; {metrics['parameters'] / 1e6:.2f}M parameters.

## Training
- Command: `{run_info.get('command') or 'see train_config in metrics.json'}`
{_init_line(run_info)}- Seed {cfg.seed}; {metrics['step']} steps of batch {cfg.batch_size} (about {metrics['step'] * cfg.batch_size / run_info['train_items']:.2f} epochs);
  AdamW lr {cfg.lr}, {cfg.warmup_steps} warmup steps then cosine to {cfg.min_lr_ratio} x lr; weight decay {cfg.weight_decay}
  (none on the codebook, latent tokens and embeddings); grad clip {cfg.grad_clip}.
- Wall time: {metrics['train_wall_s'] / 60:.1f} min of training on this machine's CPU (2 cores shared with other jobs;
  {run_info.get('threads', '?')} torch thread(s)), plus {metrics['eval_wall_s'] / 60:.1f} min of evaluation and export.
- Final training losses (mean of the last log interval): """ + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) + f"""

## Quality (Fashion-MNIST test split, {test['test_images']} images, exported weights)
- PSNR {test['psnr_db']:.2f} dB on the 28x28 garment area ({test['psnr_32x32_db']:.2f} dB on the padded 32x32 frame).
- Codebook usage {100 * test['codebook_usage']:.1f}% ({test['codes_used']} of {test['codebook_size']} codes), code perplexity {test['code_perplexity']:.0f}.
{_rfid_line(test)}- `reconstructions.png`: rows 1/3 test originals, rows 2/4 their reconstructions.

## Use
```python
from argen.tokenizers import TiTokTokenizer
tok = TiTokTokenizer.from_pretrained(folder)
codes = tok.encode(images)   # [B, 1, 32, 32] in [-1, 1] -> [B, {k}]
images = tok.decode(codes)
```
"""
    atomic_write_text(folder / "MODEL_CARD.md", text)


def write_flextok_card(folder: Path, metrics: dict, cfg: TrainConfig, run_info: dict) -> None:
    fc = run_info["flextok_config"]
    test = metrics["test"]
    losses = metrics["final_train_losses"]
    k = fc["num_registers"]
    grid = IMAGE_SIZE // fc["patch_size"]
    levels = fc["fsq_levels"]
    rfid = _rfid_line(test, at=f"at k = {k}")
    text = f"""# FlexTok tokenizer for Fashion-MNIST: 1 to {k} ordered 1D tokens

`argen.tokenizers.FlexTokTokenizer`, argen's own pixel-space FlexTok (the official apple/ml-flextok
releases inference code only), trained {_origin(run_info)} on the Fashion-MNIST train split (60,000 images)
with `argen train tokenizer --arch flextok`. Design and the per-k table: `docs/flextok.md`.

## Design
- Input: 28x28 grey images padded with background to {IMAGE_SIZE}x{IMAGE_SIZE} (the frames of `default-vq`), [-1, 1].
- Encoder: {fc['patch_size']}x{fc['patch_size']} patches ({grid}x{grid}) + {k} learned registers, width {fc['enc_width']}, {fc['enc_layers']} layers,
  {fc['enc_heads']} heads; patches attend to patches, register i to every patch and registers 0..i.
- Bottleneck: linear to {len(levels)} dims, FSQ levels {levels} ({math.prod(levels)} codes; `vector_quantize_pytorch.FSQ`).
- Decoder: rectified flow over the {grid * grid} noised patches + {k} register slots (width {fc['dec_width']}, {fc['dec_layers']} layers,
  {fc['dec_heads']} heads, adaLN-Zero time conditioning), velocity target noise - image.
- Flow times sigma = sigmoid(n), n ~ N({fc.get('time_mean', 0.0)}, 1) (FlexTok: mean 0).
{_saturation_line(run_info)}- Nested dropout ({fc['nested_dropout']}{_full_share(fc)}): keep the first k registers, the rest become a learned mask token; with
  probability {fc['cfg_dropout']} none is kept (the null condition for register guidance).
- Decoding defaults stored with the model: {fc['flow_steps']} Euler steps (diffusers `FlowMatchEulerDiscreteScheduler`,
  uniform sigmas), guidance scale {fc['guidance_scale']}{' (off)' if fc['guidance_scale'] <= 1 else ' on the registers'}; image i's noise from seed i only.
{_gan_lines(run_info)}- Weights: EMA (decay {cfg.ema_decay}), stored as {metrics['export_dtype']}; {metrics['parameters'] / 1e6:.2f}M parameters.

## Training
- Command: `{run_info.get('command') or 'see train_config in metrics.json'}`
{_init_line(run_info)}- Seed {cfg.seed}; {metrics['step']} steps of batch {cfg.batch_size} (about {metrics['step'] * cfg.batch_size / run_info['train_items']:.2f} epochs);
  AdamW lr {cfg.lr}, {cfg.warmup_steps} warmup steps then cosine to {cfg.min_lr_ratio} x lr; weight decay {cfg.weight_decay}
  (none on registers, mask token and positional embeddings); grad clip {cfg.grad_clip}.
- Wall time: {metrics['train_wall_s'] / 60:.1f} min of training on this machine's CPU (2 cores shared with other jobs;
  {run_info.get('threads', '?')} torch thread(s)), plus {metrics['eval_wall_s'] / 60:.1f} min of evaluation and export.
- Final training losses (mean of the last log interval): """ + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) + f"""

## Quality at k = {k} (Fashion-MNIST test split, first {test['test_images']} images, exported weights, {fc['flow_steps']} flow steps{f", register guidance {fc['guidance_scale']:g}" if fc['guidance_scale'] > 1 else ""})
- PSNR {test['psnr_db']:.2f} dB on the 28x28 garment area ({test['psnr_32x32_db']:.2f} dB on the padded 32x32 frame).
- Code usage {100 * test['codebook_usage']:.1f}% ({test['codes_used']} of {test['codebook_size']} codes), code perplexity {test['code_perplexity']:.0f}.
{rfid}- `reconstructions.png`: rows 1/3 test originals, rows 2/4 their reconstructions (k = {k});
  `prefixes.png`: originals, then decodes of the first k = 1, 2, 4, ..., {k} tokens.

## Use
```python
from argen.tokenizers import FlexTokTokenizer
tok = FlexTokTokenizer.from_pretrained(folder)
codes = tok.encode(images)                     # [B, 1, 32, 32] in [-1, 1] -> [B, {k}], coarse to fine
images = tok.decode(codes[:, :4], seeds=[0, 1, ...])   # any prefix; num_steps=, guidance_scale= optional
```
"""
    atomic_write_text(folder / "MODEL_CARD.md", text)
