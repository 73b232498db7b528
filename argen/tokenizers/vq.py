"""LlamaGen VQ tokenizer (`tokenizer/tokenizer_image/vq_model.py`), loadable from official weights.

Conv encoder -> 1x1 `quant_conv` -> nearest L2-normalised codebook entry -> 1x1
`post_quant_conv` -> conv decoder. Module names are the official ones. Unlike the official
class, channel width (`ch`), res blocks per level and image channels are configurable (the
official code fixes 128, 2 and 3) so small tokenizers can be trained here.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..errors import ArgenError
from ..models.checkpoint import load_checkpoint_into
from ..models.pretrained import PretrainedMixin
from ..registry import register
from .base import ImageShapeFromConfig, ImageTokenizer
from .layers import Conv2d, GroupNorm, silu


def normalize(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (scale c^-0.5)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        weights = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        # LlamaGen quirk: asymmetric zero padding (right and bottom only) before the stride-2 conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampling."""

    def __init__(self, channels_in, channels_out, n_res, with_attn, resample, dropout, groups):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_res):
            self.res.append(ResnetBlock(channels_in, channels_out, dropout, groups))
            channels_in = channels_out
            if with_attn:
                self.attn.append(AttnBlock(channels_out, groups))
        if resample == "down":
            self.downsample = Downsample(channels_out)
        elif resample == "up":
            self.upsample = Upsample(channels_out)

    def forward(self, x):
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def mid_blocks(channels: int, dropout: float, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, dropout, groups)])


class Encoder(nn.Module):
    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout, groups):
        super().__init__()
        self.conv_in = Conv2d(in_channels, ch, 3, 1, 1)
        widths = [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        channels = ch
        for level, width in enumerate(widths):
            self.conv_blocks.append(Level(channels, width, num_res_blocks, with_attn=level == last,
                                          resample=None if level == last else "down", dropout=dropout, groups=groups))
            channels = width
        self.mid = mid_blocks(channels, dropout, groups)
        self.norm_out = normalize(channels, groups)
        self.conv_out = Conv2d(channels, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Levels run deepest first (`conv_blocks.0` is the deepest), num_res_blocks + 1 each."""

    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, z_channels, dropout, groups):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        channels = widths[0]
        self.conv_in = Conv2d(z_channels, channels, 3, 1, 1)
        self.mid = mid_blocks(channels, dropout, groups)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            self.conv_blocks.append(Level(channels, width, num_res_blocks + 1, with_attn=level == 0,
                                          resample=None if level == last else "up", dropout=dropout, groups=groups))
            channels = width
        self.norm_out = normalize(channels, groups)
        self.conv_out = Conv2d(channels, out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if show_usage:
            # Training-only usage tracker; official checkpoints carry it, so it is kept.
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def nearest(self, z: torch.Tensor):
        """z [B, C, h, w] -> (indices [B, h, w], z normalised [B, h, w, C], quantised [B, h, w, C])."""
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        book = self.codebook()
        # Same distance expression as the official code, so ties break identically.
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()
        indices = dist.argmin(dim=1)
        return indices.view(z.shape[:-1]), z, book[indices].view(z.shape)


@register
class VQTokenizer(PretrainedMixin, ModelMixin, ConfigMixin, ImageShapeFromConfig, ImageTokenizer):
    """2D VQ tokenizer (LlamaGen's VQ architecture). Codes are [B, h*w] in raster order over an
    h x w grid, h = w = image_size / 2**(len(ch_mult) - 1). Like the official model, `encode` also
    takes other (non-square) sizes, any multiple of that factor, and `decode` their [B, h, w] codes."""

    config_name = "config.json"
    # Everything after the codebook lookup (decoder-only fine-tuning trains these, nothing else).
    decoder_param_prefixes = ("decoder.", "post_quant_conv.")

    @register_to_config
    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8, codebook_l2_norm: bool = True,
                 codebook_show_usage: bool = True, commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0,
                 encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4), decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 z_channels: int = 256, dropout_p: float = 0.0, ch: int = 128, num_res_blocks: int = 2,
                 in_channels: int = 3, norm_groups: int = 32, image_size: int = 256):
        super().__init__()
        if len(encoder_ch_mult) != len(decoder_ch_mult):
            raise ArgenError("encoder_ch_mult and decoder_ch_mult must have the same length")
        for width in {ch * m for m in list(encoder_ch_mult) + list(decoder_ch_mult)}:
            if width % norm_groups:
                raise ArgenError(f"channel width {width} is not divisible by norm_groups={norm_groups}")
        self.encoder = Encoder(in_channels, ch, encoder_ch_mult, num_res_blocks, z_channels, dropout_p, norm_groups)
        self.decoder = Decoder(in_channels, ch, decoder_ch_mult, num_res_blocks, z_channels, dropout_p, norm_groups)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, codebook_l2_norm, codebook_show_usage)
        self.quant_conv = Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = Conv2d(codebook_embed_dim, z_channels, 1)

    # Official `VQ ModelArgs` fields; `ch` and `num_res_blocks` are fixed (128, 2) officially.
    @classmethod
    def from_llamagen(cls, checkpoint, prefer_ema: bool = False, **vq_args) -> "VQTokenizer":
        """Build from official LlamaGen VQ weights (path or state dict) and VQ `ModelArgs` fields."""
        model = cls(**vq_args)
        return load_checkpoint_into(model, checkpoint, prefer_ema).eval()

    # ---- ImageTokenizer -------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    @property
    def grid(self) -> tuple:
        side = self.config.image_size // self.downsample_factor
        return (side, side)

    code_shape = grid  # the name used before the tokenizer contract

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def codebook_embeddings(self) -> torch.Tensor:
        return self.quantize.codebook().detach()

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ArgenError(f"images must be [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample_factor or images.shape[-2] % self.downsample_factor:
            raise ArgenError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.downsample_factor}")

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> codes [B, h*w] (raster order)."""
        self._check_images(images)
        images = images.to(self.quant_conv.weight.dtype)
        return self.quantize.nearest(self.encode_latent(images))[0].flatten(1)

    def decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant)).contiguous()  # packed convolutions end channels-last

    def decode(self, codes: torch.Tensor, *, seeds=None) -> torch.Tensor:
        """codes [B, h*w] on this tokenizer's `grid`, or [B, h, w] on any h x w grid -> images
        [B, C, h*f, w*f] (f = `downsample_factor`), about [-1, 1]. The decoder is deterministic:
        `seeds` is accepted for the contract and unused.

        [B, h, w] is the official `decode_code(codes, shape=[B, C, h, w])`: the decoder is fully
        convolutional (its attention runs over whatever h*w positions it gets), so codes from
        `encode` of a non-square H x W image decode as `codes.view(B, H // f, W // f)`.
        """
        if codes.dim() == 3:
            # The grid comes from the codes' shape, not the config: a [B, 2, 8] map is not the 4 x 4 grid.
            b, h, w = codes.shape
            if h < 1 or w < 1:
                raise ArgenError(f"codes [B, h, w] need h, w >= 1, got {tuple(codes.shape)}")
            codes = self.check_codes(codes.reshape(b, h * w), max_tokens=h * w)
        else:
            if codes.dim() == 2 and codes.shape[1] != self.num_tokens:
                raise ArgenError(f"codes must be [B, {self.num_tokens}] for this {self.grid} grid, or [B, h, w] "
                                 f"for another grid, got {tuple(codes.shape)}")
            codes = self.check_codes(codes)
            h, w = self.grid
        quant = self.quantize.codebook()[codes.reshape(-1, h, w)].permute(0, 3, 1, 2).contiguous()
        return self.decode_latent(quant)

    def forward(self, images: torch.Tensor):
        """Training forward: (reconstruction, codebook loss, commitment loss, codes).

        Losses as the official quantizer: codebook = mean((z_q - sg(z))^2), commitment =
        beta * mean((sg(z_q) - z)^2), straight-through estimator for the decoder input.
        """
        indices, z, z_q = self.quantize.nearest(self.encode_latent(images))
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        commit_loss = self.config.commit_loss_beta * torch.mean((z_q.detach() - z) ** 2)
        z_q = z + (z_q - z).detach()
        recon = self.decode_latent(z_q.permute(0, 3, 1, 2).contiguous())
        return recon, codebook_loss, commit_loss, indices
