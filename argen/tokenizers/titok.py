"""TiTok 1D tokenizer (bytedance/1d-tokenizer, `modeling/titok.py`), computing what the official code computes.

An image becomes K discrete tokens with no spatial layout:

    pixels [0, 1] -> ViT encoder over [class, g*g patches] + K learned latent tokens
    -> the K latent outputs -> 1x1 conv to `token_size` -> nearest codebook entry (float32,
    optionally cosine: both sides L2-normalised) -> ViT decoder over [class, g*g mask tokens]
    + K projected codes -> the g*g mask-token outputs -> a head.

Two heads, chosen by `is_legacy` exactly as the official config does:
- legacy (released L-32 / B-64 / S-128): 1024-way logits per decoder grid cell over the
  MaskGIT-VQGAN codebook ("proxy codes"). Stage-2 checkpoints (`finetune_decoder`) add that
  codebook (`pixel_quantize`) and the MaskGIT-VQGAN pixel decoder (`pixel_decoder`): the softmax
  of the logits mixes the codebook vectors and the pixel decoder turns them into RGB.
- current (`is_legacy: False`, the vq8k releases): a 1x1 conv to p*p*3 values per cell, unpacked
  into p x p pixel patches, then a 3x3 conv. Direct RGB.

Module and parameter names are the official ones, so official state dicts load unchanged.
Width, depth and heads are plain configuration; `config_from_official` maps the official size
names ("small"/"base"/"large") to the official table. TiTok works on [0, 1] pixels; the
`ImageTokenizer` methods (`encode`, `decode`, `forward`) take and return argen's [-1, 1] and
convert at the boundary. The official-layout methods (`encode_latent`, `quantize`,
`decode_latent`, `decode_tokens`) work in TiTok's own [0, 1] convention.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..errors import ArgenError, CheckpointError
from ..models.checkpoint import load_into, load_state_dict_file
from ..models.pretrained import PretrainedMixin
from ..registry import register
from .base import ImageShapeFromConfig, ImageTokenizer
from .layers import Conv2d, GroupNorm, silu

# Official ViT size table (identical in TiTokEncoder and TiTokDecoder): name -> (width, layers, heads).
OFFICIAL_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}

# The released tokenizers' `model.vq_model` + crop size (configs/infer/*.yaml, configs/titok_*.yaml),
# so `tokenizer_titok_l32.bin` loads without its yaml. The legacy ones leave `is_legacy` and
# `finetune_decoder` to the official defaults (both True): they are stage-2 checkpoints.
_LEGACY = dict(codebook_size=4096, token_size=12, use_l2_norm=True, commitment_cost=0.25,
               vit_enc_patch_size=16, vit_dec_patch_size=16)
_VQ8K = dict(codebook_size=8192, token_size=64, use_l2_norm=False, commitment_cost=0.25,
             vit_enc_patch_size=16, vit_dec_patch_size=16, finetune_decoder=False, is_legacy=False)
RELEASED_CONFIGS = {
    "l32": dict(_LEGACY, vit_enc_model_size="large", vit_dec_model_size="large", num_latent_tokens=32),
    "b64": dict(_LEGACY, vit_enc_model_size="base", vit_dec_model_size="base", num_latent_tokens=64),
    "s128": dict(_LEGACY, vit_enc_model_size="small", vit_dec_model_size="small", num_latent_tokens=128),
    "bl64_vq8k": dict(_VQ8K, vit_enc_model_size="base", vit_dec_model_size="large", num_latent_tokens=64),
    "bl128_vq8k": dict(_VQ8K, vit_enc_model_size="base", vit_dec_model_size="large", num_latent_tokens=128),
    "sl256_vq8k": dict(_VQ8K, vit_enc_model_size="small", vit_dec_model_size="large", num_latent_tokens=256),
}

# Hub folders written by the official `TiTok.save_pretrained` (PyTorchModelHubMixin): safetensors
# with recent huggingface_hub, a torch pickle with old ones.
HUB_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


# ---- ViT parts -------------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    """open_clip block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); exact GELU, MLP ratio 4.

    `nn.MultiheadAttention` in its default sequence-first layout, as the official block: the same
    module gives the same parameter names (`in_proj_weight`, `out_proj`) and the same kernels, so
    outputs match the official ones to float rounding. Inputs are [L, B, D].
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    x = x.permute(1, 0, 2)  # [B, L, D] -> [L, B, D] for the sequence-first attention
    for block in blocks:
        x = block(x)
    return x.permute(1, 0, 2)


def _rows(param: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A [n, D] parameter as a [B, n, D] batch."""
    return param.unsqueeze(0).expand(batch, -1, -1).to(dtype)


class TiTokEncoder(nn.Module):
    """Pixels [B, C, H, W] in [0, 1] + latent tokens [K, width] -> [B, token_size, 1, K]."""

    def __init__(self, image_size, patch_size, in_channels, width, layers, heads, num_latent_tokens, token_size,
                 is_legacy):
        super().__init__()
        self.grid_size = image_size // patch_size
        self.width = width
        self.num_latent_tokens = num_latent_tokens
        self.token_size = token_size
        self.is_legacy = is_legacy
        self.patch_embed = Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=True)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = Conv2d(width, token_size, kernel_size=1, bias=True)

    def forward(self, pixel_values: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        x = self.patch_embed(pixel_values)
        x = x.reshape(b, self.width, -1).permute(0, 2, 1)  # [B, g*g, width], raster order
        x = torch.cat([_rows(self.class_embedding, b, x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        latents = _rows(latent_tokens, b, x.dtype) + self.latent_token_positional_embedding.to(x.dtype)
        x = torch.cat([x, latents], dim=1)
        x = _run_blocks(self.transformer, self.ln_pre(x))
        latents = self.ln_post(x[:, 1 + self.grid_size ** 2:])  # [B, K, width]
        k = self.num_latent_tokens
        if self.is_legacy:
            # The official legacy quirk, kept on purpose: a *reshape* of [B, K, width] to
            # [B, width, K, 1] (not a permute), which mixes tokens and channels before conv_out.
            # The released L-32 / B-64 / S-128 weights were trained through it.
            latents = latents.reshape(b, self.width, k, 1)
        else:
            latents = latents.reshape(b, k, self.width, 1).permute(0, 2, 1, 3)
        latents = self.conv_out(latents)  # [B, token_size, K, 1]
        return latents.reshape(b, self.token_size, 1, k)


class PatchesToPixels(nn.Module):
    """[B, p*p*C, g, g] -> [B, C, g*p, g*p]: channel index = (row in patch, column in patch, colour),
    colour fastest (the official einops pattern 'b (p1 p2 c) h w -> b c (h p1) (w p2)'). No weights."""

    def __init__(self, patch_size: int, channels: int):
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, gh, gw = x.shape
        p, c = self.patch_size, self.channels
        x = x.reshape(b, p, p, c, gh, gw).permute(0, 3, 4, 1, 5, 2)  # b c h p1 w p2
        return x.reshape(b, c, gh * p, gw * p)


class TiTokDecoder(nn.Module):
    """Codes [B, token_size, 1, K] -> proxy-code logits [B, n_proxy, g, g] (legacy) or RGB [B, C, H, W]."""

    def __init__(self, image_size, patch_size, out_channels, width, layers, heads, num_latent_tokens, token_size,
                 is_legacy, proxy_codebook_size):
        super().__init__()
        self.grid_size = image_size // patch_size
        self.width = width
        self.num_latent_tokens = num_latent_tokens
        self.decoder_embed = nn.Linear(token_size, width, bias=True)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        if is_legacy:
            self.ffn = nn.Sequential(Conv2d(width, 2 * width, 1, bias=True), nn.Tanh(),
                                     Conv2d(2 * width, proxy_codebook_size, 1, bias=True))
            self.conv_out = nn.Identity()
        else:
            self.ffn = nn.Sequential(Conv2d(width, patch_size * patch_size * out_channels, 1, bias=True),
                                     PatchesToPixels(patch_size, out_channels))
            self.conv_out = Conv2d(out_channels, out_channels, 3, padding=1, bias=True)

    def forward(self, z_quantized: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z_quantized.shape
        if h != 1 or w != self.num_latent_tokens:
            raise ArgenError(f"decoder input must be [B, C, 1, {self.num_latent_tokens}], got {tuple(z_quantized.shape)}")
        x = self.decoder_embed(z_quantized.reshape(b, c, w).permute(0, 2, 1))  # [B, K, width]
        g2 = self.grid_size ** 2
        masks = self.mask_token.repeat(b, g2, 1).to(x.dtype)
        masks = torch.cat([_rows(self.class_embedding, b, masks.dtype), masks], dim=1)
        masks = masks + self.positional_embedding.to(masks.dtype)
        x = x + self.latent_token_positional_embedding[:w]
        x = _run_blocks(self.transformer, self.ln_pre(torch.cat([masks, x], dim=1)))
        x = self.ln_post(x[:, 1:1 + g2])  # only the mask-token outputs; class and latent slots dropped
        x = x.permute(0, 2, 1).reshape(b, self.width, self.grid_size, self.grid_size)
        return self.conv_out(self.ffn(x.contiguous()))


class VectorQuantizer(nn.Module):
    """Codebook lookup as the official `VectorQuantizer` (no clustering VQ: TiTok never enables it).

    Always float32, under autocast or not: distances between nearly equal codes must not depend on
    the model dtype. With `use_l2_norm` the latent and the codebook are normalised before the
    distance, and the returned latent is the normalised code (cosine lookup).
    """

    def __init__(self, codebook_size: int, token_size: int, commitment_cost: float, use_l2_norm: bool):
        super().__init__()
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        """[codebook_size, token_size] float32, as the distance sees it (normalised if cosine)."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for any-shaped indices -> [..., token_size] float32 (official get_codebook_entry)."""
        return self.codebook()[indices]

    def forward(self, z: torch.Tensor):
        """z [B, C, 1, K] -> (z_quantized [B, C, 1, K] with straight-through gradient, dict of losses and
        `min_encoding_indices` [B, 1, K]), the official return layout."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).contiguous()  # [B, 1, K, C]
            flat = z.reshape(-1, z.shape[-1])
            book = self.codebook()
            if self.use_l2_norm:
                flat = F.normalize(flat, dim=-1)
            # The official expression, term for term, so near-ties break the same way.
            dist = (flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)
                    - 2 * torch.einsum("bd,dn->bn", flat, book.t()))
            indices = dist.argmin(dim=1)
            z_q = book[indices].view(z.shape)
            if self.use_l2_norm:
                # Official code normalises the looked-up code a second time (and z itself);
                # repeated here so the result is the same to the last bit.
                z_q = F.normalize(z_q, dim=-1)
                z = F.normalize(z, dim=-1)
            commitment_loss = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
            codebook_loss = torch.mean((z_q - z.detach()) ** 2)
            z_q = z + (z_q - z).detach()
            z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q, dict(quantizer_loss=commitment_loss + codebook_loss, commitment_loss=commitment_loss,
                         codebook_loss=codebook_loss,
                         min_encoding_indices=indices.view(z_q.shape[0], z_q.shape[2], z_q.shape[3]))


# ---- MaskGIT-VQGAN pixel decoder (legacy stage 2) --------------------------------------------
# The official `modeling/modules/maskgit_vqgan.py` (via open-muse). Its `Conv2dSame` pads
# ceil-"same"; every conv here has stride 1 and an odd kernel, where that is symmetric padding
# (k - 1) / 2, so a plain Conv2d with `padding=k // 2` computes the same thing.


def _same_conv(cin: int, cout: int, k: int, bias: bool = True) -> Conv2d:
    return Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class PixelResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.changes_width = cin != cout
        self.norm1 = GroupNorm(groups, cin, eps=1e-6, affine=True)
        self.conv1 = _same_conv(cin, cout, 3, bias=False)
        self.norm2 = GroupNorm(groups, cout, eps=1e-6, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = _same_conv(cout, cout, 3, bias=False)
        if self.changes_width:
            # Official quirk: an out -> out 1x1 conv, applied to the block's *output*, not its input.
            self.nin_shortcut = _same_conv(cout, cout, 1, bias=False)

    def forward(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        residual = self.nin_shortcut(h) if self.changes_width else x
        return h + residual


class PixelUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList()
        for _ in range(num_res_blocks):
            self.block.append(PixelResnetBlock(cin, cout, groups))
            cin = cout
        self.add_upsample = upsample
        if upsample:
            self.upsample_conv = _same_conv(cout, cout, 3)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if self.add_upsample:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class PixelDecoder(nn.Module):
    """MaskGIT-VQGAN decoder: [B, z_channels, g, g] -> RGB [B, C, g * 2**(levels-1), ...], about [0, 1].

    `up[i]` is level i (0 = full resolution, no upsampling); they run deepest first.
    """

    def __init__(self, hidden_channels: int, channel_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 out_channels: int, groups: int = 32):
        super().__init__()
        mult = list(channel_mult)
        deepest = hidden_channels * mult[-1]
        self.conv_in = _same_conv(z_channels, deepest, 3)
        self.mid = nn.ModuleList([PixelResnetBlock(deepest, deepest, groups) for _ in range(num_res_blocks)])
        self.up = nn.ModuleList()
        for level in range(len(mult)):
            cin = hidden_channels * (mult[-1] if level == len(mult) - 1 else mult[level + 1])
            self.up.append(PixelUpBlock(cin, hidden_channels * mult[level], num_res_blocks, level != 0, groups))
        self.norm_out = GroupNorm(groups, hidden_channels * mult[0], eps=1e-6, affine=True)
        self.conv_out = _same_conv(hidden_channels * mult[0], out_channels, 3)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in reversed(self.up):
            h = block(h)
        return self.conv_out(silu(self.norm_out(h)))


class PixelQuantizer(nn.Module):
    """Holds the MaskGIT-VQGAN codebook (`pixel_quantize.embedding.weight`); stage 2 only reads it."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)


# ---- the tokenizer ---------------------------------------------------------------------------


@register
class TiTokTokenizer(PretrainedMixin, ModelMixin, ConfigMixin, ImageShapeFromConfig, ImageTokenizer):
    """TiTok: images <-> K 1D codes. Codes are [B, K] int64 (`grid` is None: no spatial layout).

    Config names follow argen style; `config_from_official` translates an official config
    (`model.vq_model` + `dataset.preprocessing.crop_size`). `finetune_decoder` (official name and
    meaning) adds the legacy stage-2 pixel path; `pixel_*` fields size it (official: 128,
    (1, 1, 2, 2, 4), 2, 256, 1024 codes, which turns a 16 x 16 proxy grid into 256 x 256 pixels).
    """

    config_name = "config.json"
    # Everything after the codebook lookup (decoder-only fine-tuning trains these, nothing else).
    decoder_param_prefixes = ("decoder.",)

    @register_to_config
    def __init__(self, image_size: int = 256, in_channels: int = 3, num_latent_tokens: int = 32,
                 codebook_size: int = 4096, token_size: int = 12, use_l2_norm: bool = True,
                 commitment_cost: float = 0.25, enc_patch_size: int = 16, enc_width: int = 1024,
                 enc_layers: int = 24, enc_heads: int = 16, dec_patch_size: int = 16, dec_width: int = 1024,
                 dec_layers: int = 24, dec_heads: int = 16, is_legacy: bool = True, finetune_decoder: bool = False,
                 proxy_codebook_size: int = 1024, pixel_codebook_dim: int = 256, pixel_hidden_channels: int = 128,
                 pixel_channel_mult: Sequence[int] = (1, 1, 2, 2, 4), pixel_num_res_blocks: int = 2):
        super().__init__()
        for name, patch in (("enc_patch_size", enc_patch_size), ("dec_patch_size", dec_patch_size)):
            # Not required to divide image_size: the official grid is image_size // patch (the conv
            # drops the remainder), and checkpoints made that way must still load.
            if not 1 <= patch <= image_size:
                raise ArgenError(f"{name}={patch} must be between 1 and image_size={image_size}")
        for name, width, heads in (("enc", enc_width, enc_heads), ("dec", dec_width, dec_heads)):
            if heads < 1 or width % heads:
                raise ArgenError(f"{name}_width {width} is not divisible by {name}_heads={heads}")
        if finetune_decoder and not is_legacy:
            raise ArgenError("finetune_decoder (the MaskGIT-VQGAN pixel path) needs is_legacy=True: "
                             "only the legacy head predicts proxy codes")
        if finetune_decoder:
            # No check that the pixel decoder's output side (proxy grid * 2**(levels-1)) equals
            # image_size: the official code does not check it either, and its hard-coded pixel
            # decoder on another grid still runs (and is still what a checkpoint computes).
            for m in pixel_channel_mult:
                if (pixel_hidden_channels * m) % 32:
                    raise ArgenError(f"pixel decoder width {pixel_hidden_channels * m} is not divisible by 32 "
                                     "(its GroupNorm has 32 groups)")
        self.encoder = TiTokEncoder(image_size, enc_patch_size, in_channels, enc_width, enc_layers, enc_heads,
                                    num_latent_tokens, token_size, is_legacy)
        self.decoder = TiTokDecoder(image_size, dec_patch_size, in_channels, dec_width, dec_layers, dec_heads,
                                    num_latent_tokens, token_size, is_legacy, proxy_codebook_size)
        self.latent_tokens = nn.Parameter(enc_width ** -0.5 * torch.randn(num_latent_tokens, enc_width))
        # Official order: the truncated-normal init covers encoder, decoder and latent tokens; the
        # quantiser is built afterwards and keeps its uniform init.
        self.apply(self._init_weights)
        self.quantize = VectorQuantizer(codebook_size, token_size, commitment_cost, use_l2_norm)
        if finetune_decoder:
            self.pixel_quantize = PixelQuantizer(proxy_codebook_size, pixel_codebook_dim)
            self.pixel_decoder = PixelDecoder(pixel_hidden_channels, pixel_channel_mult, pixel_num_res_blocks,
                                              pixel_codebook_dim, in_channels)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.zeros_(module.bias)
            nn.init.ones_(module.weight)

    # ---- official-layout computation, pixels in [0, 1] ----------------------------------------

    @property
    def has_pixel_decoder(self) -> bool:
        return not self.config.is_legacy or self.config.finetune_decoder

    def encode_latent(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] in [0, 1] -> encoder output [B, token_size, 1, K] (before quantisation)."""
        return self.encoder(pixels01, self.latent_tokens)

    def decode_latent(self, z_quantized: torch.Tensor) -> torch.Tensor:
        """Official `TiTok.decode`: [B, token_size, 1, K] -> legacy stage 1: proxy-code logits
        [B, n_proxy, g, g]; otherwise RGB about [0, 1], not clamped."""
        out = self.decoder(z_quantized).contiguous()  # packed convolutions end channels-last (`layers.Conv2d`)
        if self.config.finetune_decoder:
            # Stage 2: the softmax over proxy codes mixes the MaskGIT-VQGAN codebook vectors.
            soft = torch.einsum("nchw,cd->ndhw", out.softmax(1), self.pixel_quantize.embedding.weight)
            out = self.pixel_decoder(soft).contiguous()
        return out

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Official `TiTok.decode_tokens`: codes [B, K] or [B, 1, K] -> `decode_latent` of their vectors."""
        tokens = self._check_codes(tokens)
        z = self.quantize.lookup(tokens).to(self.decoder.decoder_embed.weight.dtype)  # [B, K, C]
        return self.decode_latent(z.permute(0, 2, 1).unsqueeze(2).contiguous())

    # ---- ImageTokenizer ------------------------------------------------------------------------

    @property
    def code_shape(self) -> tuple:
        return (self.config.num_latent_tokens,)

    @property
    def grid(self):
        return None  # 1D tokens: no spatial layout (samplers that need a grid must refuse)

    @property
    def num_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def codebook_embeddings(self) -> torch.Tensor:
        """[vocab_size, token_size] float32: the codes as the lookup compares them (L2-normalised if cosine)."""
        return self.quantize.codebook().detach()

    def _check_images(self, images: torch.Tensor) -> None:
        want = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ArgenError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}] (TiTok's positional "
                             f"embeddings fix the size), got {tuple(images.shape)}")

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() == 3 and codes.shape[1] == 1:
            codes = codes[:, 0]  # the official [B, 1, K] layout
        k = self.config.num_latent_tokens
        if codes.dim() != 2 or codes.shape[1] != k:
            raise ArgenError(f"codes must be [B, {k}], got {tuple(codes.shape)}")
        if codes.is_floating_point():
            raise ArgenError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ArgenError(f"code id out of range: valid ids are 0..{self.vocab_size - 1}")
        return codes.long()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> codes [B, K] int64."""
        self._check_images(images)
        pixels = (images.to(self.latent_tokens.dtype) + 1) / 2  # argen [-1, 1] -> TiTok [0, 1]
        _, result = self.quantize(self.encode_latent(pixels))
        return result["min_encoding_indices"][:, 0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, *, seeds=None, generator=None) -> torch.Tensor:
        """codes [B, K] -> images [B, C, H, W] in [-1, 1].

        Clamped to [0, 1] in TiTok's range first, as the official demo does. The decoder is
        deterministic, so `seeds` / `generator` (tokenizer contract) are accepted and unused.
        """
        if not self.has_pixel_decoder:
            raise ArgenError("this TiTok is a legacy stage-1 model: its decoder predicts MaskGIT-VQGAN proxy "
                             "codes, not pixels; load the stage-2 checkpoint (with pixel_decoder.* weights) "
                             "or use decode_tokens() for the proxy-code logits")
        pixels = self.decode_tokens(codes).float().clamp(0.0, 1.0)
        return pixels * 2 - 1  # TiTok [0, 1] -> argen [-1, 1]

    def forward(self, images: torch.Tensor):
        """Training forward on [-1, 1] images: (reconstruction in [-1, 1], not clamped; codebook loss;
        commitment loss; codes [B, K]). Losses as the official quantiser; straight-through estimator."""
        if self.config.is_legacy:
            raise ArgenError("training here is single-stage on pixels: build TiTokTokenizer with is_legacy=False")
        z_q, result = self.quantize(self.encode_latent((images + 1) / 2))
        recon = self.decode_latent(z_q.to(images.dtype)) * 2 - 1
        return recon, result["codebook_loss"], result["commitment_loss"], result["min_encoding_indices"][:, 0]

    # ---- official checkpoints --------------------------------------------------------------

    @classmethod
    def config_to_init_kwargs(cls, config: dict) -> dict:
        # A hub folder written by the official code has its OmegaConf dump as config.json, so
        # `from_pretrained(hub_folder)` works on it too.
        if _is_official_config(config) or _is_official_config(config.get("config") or {}):
            return config_from_official(read_official_config(config))
        return super().config_to_init_kwargs(config)

    @classmethod
    def from_official(cls, checkpoint, config=None, *, size_table: Optional[Mapping] = None,
                      **overrides) -> "TiTokTokenizer":
        """Build from official TiTok weights, read as tensors only (never unpickling code).

        checkpoint: a `tokenizer_titok_*.bin` / `.safetensors` file, a hub folder (config.json +
            model.safetensors or pytorch_model.bin, as `TiTok.save_pretrained` writes it), or a state dict.
        config: the official config as a dict, a path to its `.json` / `.yaml`, or a released name
            (`l32`, `b64`, `s128`, `bl64_vq8k`, `bl128_vq8k`, `sl256_vq8k`). Optional for a hub folder
            (its config.json) and for files named `tokenizer_titok_<released name>.bin`.
        size_table: overrides the official ViT size table (name -> (width, layers, heads)).
        overrides: `TiTokTokenizer` arguments the official config cannot express (the official code
            hard-codes the pixel decoder, e.g. `pixel_hidden_channels`).
        """
        source = "state dict"
        if isinstance(checkpoint, Mapping):
            state = dict(checkpoint)
        else:
            path = Path(os.fspath(checkpoint)).expanduser()
            if path.is_dir():
                weights = next((path / n for n in HUB_WEIGHT_NAMES if (path / n).is_file()), None)
                if weights is None:
                    raise CheckpointError(f"{path}: no TiTok weights: put the hub folder's model.safetensors "
                                          f"(or pytorch_model.bin) next to its config.json there")
                if config is None:
                    if not (path / "config.json").is_file():
                        raise CheckpointError(f"{path}: no config.json: put the hub folder's config.json there, "
                                              f"or pass config= (a dict, a .json/.yaml path or a released name)")
                    config = path / "config.json"
                path = weights
            elif not path.is_file():
                raise CheckpointError(f"TiTok checkpoint not found: {path} (download tokenizer_titok_*.bin from "
                                      f"the hf repo fun-research/TiTok, or a hub folder, and put it there)")
            if config is None:
                config = _released_name_from_filename(path.name)
                if config is None:
                    raise CheckpointError(f"{path.name}: pass config= (the official .yaml/.json, a dict, or one of "
                                          f"{', '.join(RELEASED_CONFIGS)}): the file name names no released model")
            state = load_state_dict_file(path)
            source = str(path)
        kwargs = config_from_official(read_official_config(config), size_table)
        kwargs.update(overrides)
        # Built on the meta device and given uninitialised storage: the random init of a large
        # model (an L-32 is ~2.5 GB in float32) is skipped, since every tensor is overwritten by
        # the strict load below (TiTok has no non-persistent buffers).
        with torch.device("meta"):
            model = cls(**kwargs)
        model = model.to_empty(device="cpu")
        load_into(model, state, source=source)  # strict; one-line CheckpointError naming the bad keys
        return model.eval()


# ---- official configs ------------------------------------------------------------------------


def _is_official_config(config: Mapping) -> bool:
    return isinstance(config.get("model"), Mapping) and isinstance(config["model"].get("vq_model"), Mapping)


def _released_name_from_filename(name: str) -> Optional[str]:
    match = re.fullmatch(r"tokenizer_titok_(\w+?)(?:_imagenet)?\.(?:bin|pt|pth|safetensors)", name)
    return match.group(1) if match and match.group(1) in RELEASED_CONFIGS else None


def read_official_config(config) -> dict:
    """An official config (dict, `.json` / `.yaml` path, or released name) as a plain dict with `model.vq_model`."""
    if isinstance(config, Mapping):
        data = dict(config)
    elif isinstance(config, str) and config in RELEASED_CONFIGS:
        return {"model": {"vq_model": dict(RELEASED_CONFIGS[config])}, "dataset": {"preprocessing": {"crop_size": 256}}}
    else:
        path = Path(os.fspath(config)).expanduser()
        if not path.is_file():
            raise CheckpointError(f"TiTok config not found: {path} (pass the official .yaml/.json, a dict, or one of "
                                  f"{', '.join(RELEASED_CONFIGS)})")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml  # only needed for yaml configs; OmegaConf's ${...} stay plain strings

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # noqa: BLE001 - any parse failure is the same user error
            raise CheckpointError(f"{path}: not a readable TiTok config ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
    # huggingface_hub's mixin may nest the init argument under "config"
    if isinstance(data, Mapping) and not _is_official_config(data) and isinstance(data.get("config"), Mapping):
        data = dict(data["config"])
    if not isinstance(data, Mapping) or not _is_official_config(data):
        raise CheckpointError("TiTok config has no model.vq_model section (is it the official TiTok config?)")
    return data


def _size(table: Mapping, name: str, which: str) -> tuple:
    if name not in table:
        raise CheckpointError(f"unknown TiTok {which} size {name!r}; known: {', '.join(table)}")
    return tuple(table[name])


def _normalise_table(size_table: Optional[Mapping]) -> Mapping:
    """Accept name -> (width, layers, heads), or the official layout {width: {...}, num_layers: {...}, num_heads: {...}}."""
    if size_table is None:
        return OFFICIAL_SIZES
    if {"width", "num_layers", "num_heads"} <= set(size_table):
        return {n: (size_table["width"][n], size_table["num_layers"][n], size_table["num_heads"][n])
                for n in size_table["width"]}
    return size_table


def config_from_official(config: Mapping, size_table: Optional[Mapping] = None) -> dict:
    """Official `model.vq_model` + crop size -> `TiTokTokenizer` arguments, with the official defaults
    (`is_legacy` and `finetune_decoder` both default to True when absent, as in `modeling/titok.py`)."""
    vq = config["model"]["vq_model"]
    mode = vq.get("quantize_mode", "vq")
    if mode != "vq":
        raise CheckpointError(f"TiTok quantize_mode {mode!r} is not supported: argen tokenizers emit discrete "
                              "codes (only the VQ variants load)")
    table = _normalise_table(size_table)
    try:
        crop = config["dataset"]["preprocessing"]["crop_size"]
        enc = _size(table, vq["vit_enc_model_size"], "encoder")
        dec = _size(table, vq["vit_dec_model_size"], "decoder")
        return dict(image_size=int(crop), num_latent_tokens=int(vq["num_latent_tokens"]),
                    codebook_size=int(vq["codebook_size"]), token_size=int(vq["token_size"]),
                    use_l2_norm=bool(vq["use_l2_norm"]), commitment_cost=float(vq.get("commitment_cost", 0.25)),
                    enc_patch_size=int(vq["vit_enc_patch_size"]), enc_width=enc[0], enc_layers=enc[1], enc_heads=enc[2],
                    dec_patch_size=int(vq["vit_dec_patch_size"]), dec_width=dec[0], dec_layers=dec[1], dec_heads=dec[2],
                    is_legacy=bool(vq.get("is_legacy", True)), finetune_decoder=bool(vq.get("finetune_decoder", True)))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"TiTok config is missing {err} (needs model.vq_model fields and "
                              "dataset.preprocessing.crop_size)") from None
