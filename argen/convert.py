"""Turn official LlamaGen weights (GPT + VQ) into an argen pipeline folder.

The result loads with `ARPipeline.from_pretrained(dir)` and `argen generate --model dir`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .errors import ArgenError
from .models import GPT, GPTConfig
from .pipeline import ARPipeline
from .tokenizers import VQTokenizer

# Official VQ presets (`VQ_models` in LlamaGen): encoder/decoder channel multipliers.
VQ_PRESETS = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}


def convert_llamagen(gpt_checkpoint, vq_checkpoint, out_dir, *, gpt_size: Optional[str] = None,
                     image_size: int = 256, vq_preset: str = "VQ-16", gpt_args: Optional[dict] = None,
                     vq_args: Optional[dict] = None, class_names: Optional[Sequence[str]] = None,
                     text_encoder=None, cfg_scale: float = 2.0, prefer_ema: bool = False) -> ARPipeline:
    """Load both checkpoints (local paths, never downloaded) and save a pipeline to `out_dir`.

    gpt_args / vq_args: official `ModelArgs` fields; sensible LlamaGen defaults are filled in from
    `gpt_size` (e.g. "GPT-B"), `image_size` and `vq_preset`. For t2i pass `text_encoder`
    (e.g. `load_text_encoder("flan-t5", path=...)`).
    """
    if vq_preset not in VQ_PRESETS:
        raise ArgenError(f"unknown VQ preset {vq_preset!r}; choose one of {', '.join(VQ_PRESETS)}")
    mult = VQ_PRESETS[vq_preset]
    vq_fields = dict(codebook_size=16384, codebook_embed_dim=8, encoder_ch_mult=mult, decoder_ch_mult=mult,
                     z_channels=256, image_size=image_size)
    vq_fields.update(vq_args or {})
    vq = VQTokenizer.from_llamagen(vq_checkpoint, prefer_ema=prefer_ema, **vq_fields)
    grid = vq.grid
    fields = dict(vocab_size=vq.vocab_size, block_size=math.prod(grid))
    if gpt_size is not None:
        sizes = GPTConfig.NAMED_SIZES.get(gpt_size)
        if sizes is None:
            raise ArgenError(f"unknown GPT size {gpt_size!r}; choose one of {', '.join(GPTConfig.NAMED_SIZES)}")
        fields.update(n_layer=sizes[0], n_head=sizes[1], dim=sizes[2])
    fields.update(gpt_args or {})
    if fields.get("model_type", "c2i") == "t2i":
        fields.setdefault("cls_token_num", 120)
        if text_encoder is None:
            raise ArgenError("a text-to-image GPT needs its text encoder (FLAN-T5 for official t2i weights)")
    gpt = GPT.from_llamagen(gpt_checkpoint, prefer_ema=prefer_ema, **fields)
    cfg = gpt.gpt_config
    if cfg.model_type == "t2i":
        # checked here, not at the first prompt: a mismatched encoder would make a pipeline that cannot generate
        slots, width = text_encoder.num_slots, text_encoder.feature_dim
        if (slots, width) != (cfg.cls_token_num, cfg.caption_dim):
            raise ArgenError(f"the text encoder gives {slots} x {width} caption features, the GPT takes "
                             f"{cfg.cls_token_num} x {cfg.caption_dim} (cls_token_num x caption_dim)")
    pipe = ARPipeline(gpt, vq, text_encoder, class_names, defaults={"cfg_scale": cfg_scale})
    pipe.save_pretrained(out_dir)
    return pipe
