"""LlamaGen-style decoder-only image generator.

Numerically identical to the official LlamaGen `Transformer` (FoundationVision/LlamaGen,
`autoregressive/models/gpt.py`) and loads its state dicts unchanged: the module names below are
the official ones. The quirks that matter for exact agreement are reproduced on purpose and
marked "LlamaGen quirk" where they appear.

Two ways to call the model:

* teacher forcing, ``model(idx, cond, mask=None)`` -> logits for every position of
  ``[condition prefix ; idx]`` (training, scoring);
* the sampling contract used by every sampler in `argen.samplers`:
  ``cache = model.new_cache(...)``, ``model.prefill(cond, cache, cond_mask)`` and
  ``model.decode(tokens, input_pos, cache)``. The cache belongs to the caller, so one model can
  serve several sampling calls (and teacher-forced calls) without state leaking between them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin

from ..errors import ArgenError
from ..registry import register
from .base import COMPILE_MODES, MAX_AUTOTUNE_GEMMS, Generator, weights_key
from .cache import KVCache
from .checkpoint import load_checkpoint_into
from .onednn_products import OneDNNProducts
from .pretrained import PretrainedMixin
from .quant import (ROW_MULTIPLE, WEIGHT_FORMATS, BatchInvariantLinear, auto_weight_format, batch_invariant,
                    check_weight_format, convert_linears)


# class ids whose prefixes one forward computes (GPT._remember_prefix_block)
PREFIX_BLOCK = 16


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    """Architecture of a generator. Field names follow the official LlamaGen `ModelArgs`.

    Additions: ``rope_type`` ("2d" as in LlamaGen, or "1d" for 1D tokenizers such as TiTok),
    ``grid_size`` (rows, cols) for image token grids that are not square, and
    ``caption_token_num`` (the size of the t2i unconditional-embedding buffer; LlamaGen fixes it
    at 120).
    """

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    rope_type: str = "2d"
    grid_size: Optional[tuple] = None
    caption_token_num: int = 120

    # Official sizes (`GPT_models` in LlamaGen): (n_layer, n_head, dim).
    NAMED_SIZES = {
        "GPT-B": (12, 12, 768),
        "GPT-L": (24, 16, 1024),
        "GPT-XL": (36, 20, 1280),
        "GPT-XXL": (48, 24, 1536),
        "GPT-XXXL": (48, 40, 2560),
        "GPT-1B": (22, 32, 2048),
        "GPT-3B": (24, 32, 3200),
        "GPT-7B": (32, 32, 4096),
    }

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        if name not in cls.NAMED_SIZES:
            raise ArgenError(f"unknown GPT size {name!r}; choose one of {', '.join(cls.NAMED_SIZES)}")
        n_layer, n_head, dim = cls.NAMED_SIZES[name]
        return cls(n_layer=n_layer, n_head=n_head, dim=dim, **overrides)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ArgenError(f"unknown GPT config fields: {', '.join(unknown)}")
        return cls(**values)

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ArgenError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.model_type not in ("c2i", "t2i"):
            raise ArgenError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            # The official c2i embedding produces one token; more would break position bookkeeping.
            raise ArgenError("class-conditional models use exactly one condition token (cls_token_num=1)")
        if self.rope_type not in ("1d", "2d"):
            raise ArgenError(f"rope_type must be '1d' or '2d', got {self.rope_type!r}")
        if self.grid_size is not None:
            self.grid_size = tuple(int(g) for g in self.grid_size)
            if len(self.grid_size) != 2 or self.grid_size[0] * self.grid_size[1] != self.block_size:
                raise ArgenError(f"grid_size {self.grid_size} does not multiply to block_size={self.block_size}")
        elif self.rope_type == "2d" and math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ArgenError(f"block_size={self.block_size} is not a square grid: pass grid_size=(rows, cols)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid(self) -> Optional[tuple]:
        """(rows, cols) of the token grid; None for a 1D model (rope_type "1d" without grid_size)."""
        if self.grid_size is not None:
            return self.grid_size
        if self.rope_type == "1d":
            return None
        side = math.isqrt(self.block_size)
        return (side, side)

    @property
    def ffn_hidden_dim(self) -> int:
        # LlamaGen quirk: int(2*4*dim/3), optionally scaled, rounded up to `multiple_of`.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def seq_len(self) -> int:
        return self.cls_token_num + self.block_size


# --------------------------------------------------------------------------------------------
# RoPE tables. Shape [cls_token_num + block_size, head_dim // 2, 2] holding (cos, sin).
# LlamaGen quirk: the condition rows are all zeros (cos = sin = 0, not the identity rotation), so
# q and k of every condition position are exactly zero.


def rope_table_2d(grid: Sequence[int], head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """2D RoPE: the first head_dim/4 rotation pairs use the row index, the last head_dim/4 the column."""
    rows, cols = grid
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    r = torch.arange(rows, dtype=torch.float32)
    c = torch.arange(cols, dtype=torch.float32)
    freqs_r = torch.outer(r, freqs)  # [rows, head_dim/4]
    freqs_c = torch.outer(c, freqs)  # [cols, head_dim/4]
    angles = torch.cat(
        [freqs_r[:, None, :].expand(rows, cols, -1), freqs_c[None, :, :].expand(rows, cols, -1)], dim=-1
    ).reshape(rows * cols, half)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def rope_table_1d(length: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """1D RoPE over token index, with the same zero rows for the condition prefix."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), table])


def rope_factors(table: torch.Tensor) -> tuple:
    """(cos, sin) multipliers for `apply_rope`, built once per forward from a RoPE table.

    table: [L, hd/2, 2] or [B, L, hd/2, 2] (per-row positions). Returns two [.., L, 1, hd]
    tensors: cos repeated for both members of a pair, and (-sin, +sin) per pair, so the rotation
    is two multiplies and an add in `apply_rope`.
    """
    cos, sin = table.unbind(-1)
    cos2 = torch.stack([cos, cos], dim=-1).flatten(-2).unsqueeze(-2)
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2).unsqueeze(-2)
    return cos2, sin2


def apply_rope(x: torch.Tensor, factors: tuple) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) in float32; x: [B, L, H, hd].

    out[2k] = x[2k] cos - x[2k+1] sin and out[2k+1] = x[2k+1] cos + x[2k] sin, with the same
    float32 products and sums as LlamaGen's stack-based version (bit-identical), in a third of
    the ops: the per-step cost of a small decode is dominated by op count, not arithmetic.
    """
    cos2, sin2 = factors
    fp32 = x.dtype == torch.float32  # skip the no-op casts: each is a dispatcher call per layer and step
    xf = x if fp32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x[2k+1], x[2k]) pairs
    out = xf * cos2 + swapped * sin2
    return out if fp32 else out.type_as(x)


# --------------------------------------------------------------------------------------------
# Building blocks. Module names equal the official ones so state dicts load unchanged.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused kernel instead of seven ops; bit-identical to the lines below in float32
            # (checked against the LlamaGen fixtures and the pinned samples of the shipped models).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # LlamaGen quirk: normalise in float32, cast back, then scale.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed if x.dtype == torch.float32 else normed.type_as(x)) * self.weight


class DropPath(nn.Module):
    """Stochastic depth (per-sample residual drop), active only in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LabelEmbedder(nn.Module):
    """Class id -> one condition token. Row `num_classes` is the null (unconditional) class."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        # LlamaGen quirk: the null row exists only when class dropout is on.
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    @property
    def has_null(self) -> bool:
        return self.dropout_prob > 0

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class MLP(nn.Module):
    # batch-invariant linears: a sentence embedding is one row per caption, and MKL rounds a product of
    # 1 to 3 rows otherwise than one of 4 or more (the caption embedding of a batch of 1 to 3 differed
    # from a batch of 16's by ~1e-7 until session 26)
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = BatchInvariantLinear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = BatchInvariantLinear(hidden_features, out_features, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features [B, T, caption_dim] -> T condition tokens (LlamaGen t2i)."""

    def __init__(self, caption_dim: int, dim: int, dropout_prob: float, token_num: int):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.cap_proj = MLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    has_null = True

    def null_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.uncond_embedding[: features.shape[1]].to(features.dtype).expand_as(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Features come in float32 (the text encoders' output); a model cast to bfloat16 projects them
        # in bfloat16, as LlamaGen's bf16 sampling does with its bf16 T5 output (same numbers).
        features = features.to(self.cap_proj.fc1.weight.dtype)
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(features.shape[0], device=features.device) < self.dropout_prob
            features = torch.where(drop[:, None, None], self.null_features(features), features)
        return self.cap_proj(features)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or config.ffn_hidden_dim
        self.w1 = BatchInvariantLinear(config.dim, hidden, bias=False)
        self.w3 = BatchInvariantLinear(config.dim, hidden, bias=False)
        self.w2 = BatchInvariantLinear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows % ROW_MULTIPLE and type(self.w1) is BatchInvariantLinear:
            # pad once here instead of in each of the three products (the same zero rows, the same bits):
            # at batch 1 with CFG the three paddings are 12 small ops per FFN, 14% of default-c2i's step
            out = batch_invariant(self._swiglu, x.reshape(rows, -1)).reshape(*x.shape[:-1], -1)
        else:
            out = self._swiglu(x)
        return self.ffn_dropout(out) if self.training else out

    def _swiglu(self, x):
        return self.w2(F.silu(self.w1(x)).mul_(self.w3(x)))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v written out, for sampling (a KV-cached step or prefix with its mask).

    Why not `F.scaled_dot_product_attention`: its CPU kernel rounds a row by how the batch splits between
    threads. On three threads default-t2i's layer-0 attention gave the same query, keys, values and mask
    other floats (6e-8) at batch 3 than at 16, and 1 image in 16 sampled other tokens; synthetic [B, 4, 1, 64]
    queries differ between batch sizes on 2-4 threads (session 26, docs/architecture.md). Written out, each
    (row, head) is its own small product and softmax: the same floats at any batch size (tested on three
    threads), within ~4e-7 of the fused kernel; the shipped models' recorded tokens and the LlamaGen
    fixtures are unchanged. Eager it costs what the fused kernel does (default-c2i: +0.1% at batch 1,
    +2% at 16); compiled, inductor fuses it and a bf16 default-c2i samples 24% faster at batch 16
    (docs/architecture.md). `mask`: boolean (True = attend) or additive float."""
    # Compiled on a CPU, both products are written as products and sums: inductor fuses them into loops
    # that sum each score over the head dim and each output over the keys in one order, whatever the query
    # and key counts, so a window's forward (a speculative sampler's) gives each position the bits of AR's
    # one-token steps. As matrix products, inductor summed a window's and a step's in different orders
    # (1e-6 apart), and bf16 images then depended on the window widths `auto` chose (docs/architecture.md,
    # "Windows"). Eager keeps MKL's products: the exact form there cost every AR step 4-5%.
    as_sums = torch.compiler.is_compiling() and q.device.type == "cpu"
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) if as_sums else q @ k.transpose(-2, -1)
    scores = scores * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    return (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2) if as_sums else weights @ v


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.head_dim
        self.kv_dim = self.n_kv_head * self.head_dim
        self.wqkv = BatchInvariantLinear(config.dim, config.dim + 2 * self.kv_dim, bias=False)
        self.wo = BatchInvariantLinear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x, rope, mask=None, cache: Optional[KVCache] = None, layer: int = 0, input_pos=None):
        bsz, seqlen, _ = x.shape
        heads = self.wqkv(x).view(bsz, seqlen, self.n_head + 2 * self.n_kv_head, self.head_dim)
        n_qk = self.n_head + self.n_kv_head
        qk = apply_rope(heads[:, :, :n_qk], rope).transpose(1, 2)  # q and k rotated in one call
        q, k = qk[:, : self.n_head], qk[:, self.n_head :]
        v = heads[:, :, n_qk:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, input_pos, k, v)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if mask is not None and not self.training:
            out = masked_attention(q, k, v, mask)
        else:  # training, and the official full-sequence forward (causal, no mask)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,
                dropout_p=self.attn_dropout_p if self.training else 0.0,
            )
        out = self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        return self.resid_dropout(out) if self.training else out


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rope, mask=None, cache=None, layer=0, input_pos=None):
        attn = self.attention(self.attention_norm(x), rope, mask, cache, layer, input_pos)
        if not self.training:  # skip the identity module calls: they are a visible share of a decode step
            h = x + attn
            return h + self.feed_forward(self.ffn_norm(h))
        h = x + self.drop_path(attn)
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


# --------------------------------------------------------------------------------------------


@register
class GPT(Generator, PretrainedMixin, ModelMixin, ConfigMixin):
    """The LlamaGen generator (c2i or t2i), behind the generator contract (`argen.models.base`).

    Build with `GPT(GPTConfig(...))`, `GPT(dim=..., n_layer=..., ...)` or `GPT.from_name("GPT-B", ...)`.
    """

    config_name = "config.json"

    def __init__(self, config: Optional[GPTConfig] = None, **config_fields):
        super().__init__()
        cfg = config if config is not None else GPTConfig.from_dict(config_fields)
        # Registered by hand (not with diffusers' decorator) because the fields live in GPTConfig.
        self.register_to_config(**asdict(cfg))
        self.gpt_config = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            token_num = max(cfg.caption_token_num, cfg.cls_token_num)
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.class_dropout_prob, token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        # stochastic depth grows linearly over depth (0 -> drop_path_rate), as torch.linspace would
        rates = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(cfg, rates[i]) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = BatchInvariantLinear(cfg.dim, cfg.vocab_size, bias=False)
        # The RoPE table is derived from the config, so it is a non-persistent buffer: it moves with
        # .to(device) but never enters the state dict (official files may carry it; it is ignored).
        self.register_buffer("freqs_cis", self._rope_table(), persistent=False)
        # The per-position (cos, sin) multipliers of `apply_rope`, built once: a decode step then
        # gathers two rows instead of rebuilding them (eight ops) from the table.
        cos2, sin2 = rope_factors(self.freqs_cis)
        self.register_buffer("rope_cos", cos2, persistent=False)
        self.register_buffer("rope_sin", sin2, persistent=False)
        self._init_weights()

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPT":
        return cls(GPTConfig.from_name(name, **overrides))

    # Official `ModelArgs` fields that do not change the network.
    _UNUSED_LLAMAGEN_ARGS = ("max_batch_size", "max_seq_len")

    @classmethod
    def from_llamagen(cls, checkpoint, prefer_ema: bool = False, **model_args) -> "GPT":
        """Build from official LlamaGen weights.

        `checkpoint`: a path (`.pt`/`.pth` holding {"model": ...} or {"ema": ...} or a raw FSDP
        state dict, or `.safetensors`) or a state dict. `model_args`: official `ModelArgs` field
        names (dim, n_layer, n_head, vocab_size, num_classes, block_size, cls_token_num,
        caption_dim, model_type, ...). `prefer_ema` picks "ema" over "model" when both exist
        (the official sample scripts use "model").
        """
        args = {k: v for k, v in model_args.items() if k not in cls._UNUSED_LLAMAGEN_ARGS}
        model = cls(GPTConfig.from_dict(args))
        return load_checkpoint_into(model, checkpoint, prefer_ema).eval()

    def init_from(self, source: "GPT", caption_feats: Optional[torch.Tensor] = None,
                  caption_labels: Optional[torch.Tensor] = None, fit_steps: int = 600) -> dict:
        """Start from the weights of another GPT: every weight of the same name and shape is copied
        (the condition embedding only between models of the same condition kind).

        From a class-conditional source into a one-slot text-conditional model, pass the training
        captions' features [N, D] and class labels [N]: the caption projection is first fitted so
        that each caption lands on its class's embedding and the unconditional caption on the null
        class, so the model starts from what the class-conditional one already draws. Returns what
        was copied (and the fit's final error)."""
        own = self.state_dict()
        same_kind = source.condition_kind == self.condition_kind
        copied = {k: v for k, v in source.state_dict().items()
                  if k in own and own[k].shape == v.shape and (same_kind or not k.startswith("cls_embedding."))}
        self.load_state_dict(copied, strict=False)
        info = {"copied": len(copied), "of": len(own)}
        if source.condition_kind == "class" and self.condition_kind == "text" and caption_feats is not None:
            table = source.cls_embedding.embedding_table.weight.detach()
            info["caption_fit_mse"] = _fit_caption_projection(self.cls_embedding, caption_feats, caption_labels,
                                                              table, fit_steps)
        return info

    def _rope_table(self) -> torch.Tensor:
        cfg = self.gpt_config
        if cfg.rope_type == "2d":
            return rope_table_2d(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)
        return rope_table_1d(cfg.block_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)

    def _apply(self, fn, recurse=True):
        """`.to()` and friends, but the RoPE tables stay float32 whatever the weights are cast to.

        LlamaGen quirk: its table is a plain attribute, so `model.to(torch.bfloat16)` leaves it, and
        the rotation computed from it, in float32. Cast with the weights, the bf16-rounded cos/sin moved
        a bf16 forward 0.07 away from the official one (kept float32, it equals the official one on the
        LlamaGen fixtures). Rebuilt, not cast back: the rounding cannot be undone."""
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32:
            self.freqs_cis = self._rope_table().to(self.freqs_cis.device)
            self.rope_cos, self.rope_sin = rope_factors(self.freqs_cis)
        return self

    def _init_weights(self):
        std = self.gpt_config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        # LlamaGen quirk: the output projection starts at zero.
        nn.init.zeros_(self.output.weight)

    # ---- structure (generator contract) ---------------------------------------------------

    @property
    def num_positions(self) -> int:
        return self.gpt_config.block_size

    @property
    def vocab_size(self) -> int:
        return self.gpt_config.vocab_size

    @property
    def grid(self) -> Optional[tuple]:
        return self.gpt_config.grid

    @property
    def condition_kind(self) -> str:
        return "class" if self.gpt_config.model_type == "c2i" else "text"

    @property
    def num_classes(self) -> int:
        return self.gpt_config.num_classes if self.gpt_config.model_type == "c2i" else 0

    def token_embeddings(self) -> torch.Tensor:
        return self.tok_embeddings.weight

    # ---- conditions -----------------------------------------------------------------------

    @property
    def supports_cfg(self) -> bool:
        return self.cls_embedding.has_null

    def check_condition(self, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None) -> None:
        """Raise a one-line error for conditions the model cannot take."""
        cfg = self.gpt_config
        if cfg.model_type == "c2i":
            if cond.dim() != 1 or cond.dtype not in (torch.int32, torch.int64):
                raise ArgenError(f"c2i condition must be integer class ids [B], got {tuple(cond.shape)} {cond.dtype}")
            limit = cfg.num_classes + int(self.cls_embedding.has_null)
            if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= limit):
                raise ArgenError(f"class id out of range: got {cond.tolist()}, valid ids are 0..{cfg.num_classes - 1}")
        else:
            if cond.dim() != 3 or cond.shape[-1] != cfg.caption_dim or not cond.is_floating_point():
                raise ArgenError(f"t2i condition must be float features [B, T, {cfg.caption_dim}], got {tuple(cond.shape)}")
            if cond.shape[1] != cfg.cls_token_num:
                raise ArgenError(f"t2i condition has {cond.shape[1]} tokens, the model takes {cfg.cls_token_num}")
            if cond_mask is not None and tuple(cond_mask.shape) != tuple(cond.shape[:2]):
                raise ArgenError(f"caption mask shape {tuple(cond_mask.shape)} != features {tuple(cond.shape[:2])}")

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of `cond` (null class / unconditional caption embedding)."""
        if not self.supports_cfg:
            raise ArgenError("this model was trained without condition dropout: it has no null condition for CFG")
        if self.gpt_config.model_type == "c2i":
            return torch.full_like(cond, self.gpt_config.num_classes)
        return self.cls_embedding.null_features(cond)

    def condition_length(self, cond: torch.Tensor) -> int:
        return 1 if self.gpt_config.model_type == "c2i" else cond.shape[1]

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        emb = self.cls_embedding(cond)[:, : self.gpt_config.cls_token_num]
        return emb.to(self.tok_embeddings.weight.dtype)

    def _check_tokens(self, idx: torch.Tensor) -> None:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.gpt_config.vocab_size):
            raise ArgenError(f"token id out of range: valid ids are 0..{self.gpt_config.vocab_size - 1}")

    # ---- teacher forcing ------------------------------------------------------------------

    def training_mask(self, cond_mask: torch.Tensor, length: int) -> torch.Tensor:
        """The official t2i attention mask from a caption mask [B, T] (True = real token).

        Causal, key columns of padded caption slots removed for every query, and the diagonal
        forced on so a padded row still attends to itself. Shape [B, 1, length, length].
        """
        bsz, t = cond_mask.shape
        mask = torch.tril(torch.ones(length, length, dtype=torch.bool, device=cond_mask.device)).repeat(bsz, 1, 1)
        mask[:, :, :t] &= cond_mask.bool()[:, None, :]
        mask |= torch.eye(length, dtype=torch.bool, device=cond_mask.device)
        return mask[:, None]

    def forward(self, idx: torch.Tensor, cond: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for every position of ``[condition prefix ; idx]``: [B, cls_token_num + L, V], float32.

        Position j < cls_token_num - 1 are condition positions; logits[:, cls_token_num - 1 + k]
        predicts idx[:, k]. ``mask`` is the official boolean attention mask [B, 1, S, S], or a
        caption mask [B, cls_token_num] from which it is built.
        """
        self._check_tokens(idx)
        self.check_condition(cond)
        x = torch.cat([self.embed_condition(cond), self.tok_embeddings(idx)], dim=1)
        x = self.tok_dropout(x)
        length = x.shape[1]
        if length > self.freqs_cis.shape[0]:
            raise ArgenError(f"sequence of {length} positions exceeds the model's {self.freqs_cis.shape[0]}")
        if mask is not None and mask.dim() == 2:
            mask = self.training_mask(mask, length)
        rope = (self.rope_cos[:length], self.rope_sin[:length])
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.output(self.norm(x)).float()

    def loss(self, codes: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy over every image code (teacher forcing; float32)."""
        logits = self(codes[:, :-1], cond, cond_mask)[:, self.gpt_config.cls_token_num - 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    # ---- sampling contract ----------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> KVCache:
        """A KV cache for `batch_size` rows (with CFG: 2x the real batch) and `max_len` positions."""
        cfg = self.gpt_config
        weight = self.tok_embeddings.weight
        return KVCache(
            n_layer=cfg.n_layer, batch_size=batch_size, n_head=cfg.n_kv_head or cfg.n_head,
            max_len=max_len or cfg.seq_len, head_dim=cfg.head_dim,
            device=device or weight.device, dtype=dtype or weight.dtype,
        )

    def _run_cached(self, x: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # (a compiled step's caller sets the span: `compile_step`)
            top = int(input_pos.max())  # read once: the range check and the attention span both need it
            if top >= self.freqs_cis.shape[0]:
                raise ArgenError(f"position {top} is past the model's {self.freqs_cis.shape[0]} positions")
            cache.attend_upto(input_pos, top)
        rope = (self.rope_cos[input_pos], self.rope_sin[input_pos])
        mask = cache.attention_mask(input_pos)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i, input_pos)
        return x

    def prefill(self, cond: torch.Tensor, cache: KVCache, cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the condition prefix into the cache; return the logits [B, V] of its last position.

        `cond_mask` [B, T] marks real caption tokens (t2i, left padded): padded slots are removed
        as keys for every later query, as the official sampler does.
        """
        self.check_condition(cond, cond_mask)
        t = self.condition_length(cond)
        cache.set_condition_mask(t, cond_mask)
        if self._remembers_prefix(cache):
            return self._remembered_class_prefix(cond, cache)
        return self.prefix_logits(cond, torch.arange(t, device=cache.device), cache)

    def prefix_logits(self, cond: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`prefill` after its checks: the forward of the condition at positions `input_pos`, the part
        `compile_decode` compiles with the step."""
        x = self._run_cached(self.embed_condition(cond), input_pos, cache)
        return self.output(self.norm(x[:, -1])).float()

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed tokens [B, T] at sequence positions `input_pos` ([T], or [B, T] per row).

        Writes their keys/values into the cache and returns logits [B, T, V]; logits[:, j]
        predicts the token after position input_pos[j]. Sequence position of image token k is
        cls_token_num + k. A query sees every cached key at a position <= its own, so feeding a
        window of several tokens verifies them all in one forward, and rewinding is just writing
        over the rejected positions later (see `KVCache.rewind`).
        """
        x = self.tok_embeddings(tokens)
        x = self._run_cached(x, input_pos, cache)
        return self.output(self.norm(x)).float()

    # ---- sampling -------------------------------------------------------------------------

    def prepare_for_sampling(self) -> "GPT":
        """Class prefixes remembered (below) and, on a CPU, the fp32 linears' weights stored column-major."""
        self.remembers_class_prefixes = True
        if self.tok_embeddings.weight.device.type == "cpu":  # measured there (MKL); other devices keep theirs
            self._store_linears_column_major(True)
        return self

    def _store_linears_column_major(self, column_major: bool) -> None:
        for m in self.modules():
            if type(m) is BatchInvariantLinear:
                m.store_column_major(column_major)

    # ---- class prefixes, remembered --------------------------------------------------------
    #
    # A class-conditional prefix is one position whose keys, values and first logits depend on the class id
    # and the weights alone, so each id's are computed once and copied into the cache at every later
    # prefill: a forward fewer per sampling call, about one decode step (images/s at batch 1: default-c2i +2-3%,
    # shuffle-c2i +4%, flextok-c2i at 4 tokens +9-11%; docs/history/decode.md, session 38). Ids are computed in
    # fixed blocks (PREFIX_BLOCK ids, one eager forward each), so an id gets the same bits whatever batch
    # first asked for it and in whatever weight format, compiled or not (a compiled model would otherwise
    # compile the prefix's shape too). In fp32 they are the bits the batch's own forward gives (batch-
    # invariant products and attention), so no sample changes (tested). Kept per weights (`weights_key`),
    # never saved. t2i conditions are caption features, not ids: their prefix runs its forward. Off on a
    # bare model (`Generator.remembers_class_prefixes`), whose forward hooks then see every prefill as the
    # official code runs it; a pipeline turns it on.

    def _remembers_prefix(self, cache: KVCache) -> bool:
        weight = self.tok_embeddings.weight
        return (self.remembers_class_prefixes and self.gpt_config.model_type == "c2i" and not self.training
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and cache.dtype == weight.dtype and cache.device == weight.device)

    def _remembered_class_prefix(self, labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        memo = self.__dict__.get("_prefix_memo")
        key = weights_key((*self.parameters(), *self.buffers()))
        if memo is None or memo["key"] != key:
            memo = {"key": key, "known": torch.zeros(self.cls_embedding.embedding_table.num_embeddings, dtype=torch.bool)}
            self.__dict__["_prefix_memo"] = memo  # not a buffer: derived, never saved
        ids = labels.cpu()
        missing = ids[~memo["known"][ids]]
        for block in torch.unique(missing // PREFIX_BLOCK).tolist():
            self._remember_prefix_block(memo, block)
        ids = labels.to(cache.device)
        kv = memo["kv"].index_select(0, ids)  # [B, n_layer, 2, H, 1, head_dim]
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            k[:, :, :1] = kv[:, layer, 0]
            v[:, :, :1] = kv[:, layer, 1]
        cache.lengths = cache.lengths.clamp(min=1)
        return memo["logits"].index_select(0, ids)

    def _remember_prefix_block(self, memo: dict, block: int) -> None:
        known = memo["known"]
        ids = torch.arange(block * PREFIX_BLOCK, min((block + 1) * PREFIX_BLOCK, known.shape[0]))
        scratch = self.new_cache(ids.shape[0], 1)
        pos = torch.zeros(1, dtype=torch.long, device=scratch.device)
        logits = type(self).prefix_logits(self, ids.to(scratch.device), pos, scratch)  # eager, compiled or not
        kv = torch.stack([torch.stack((k, v), 1) for k, v in zip(scratch.k, scratch.v)], 1)
        if "kv" not in memo:  # allocated on first use, filled block by block (untouched pages cost nothing)
            memo["kv"] = kv.new_empty((known.shape[0], *kv.shape[1:]))
            memo["logits"] = logits.new_empty((known.shape[0], *logits.shape[1:]))
        memo["kv"][ids], memo["logits"][ids] = kv, logits
        known[ids] = True

    def compile_decode(self, mode: str = "default", **compile_options) -> "GPT":
        """Replace `decode` on this instance by a `torch.compile`d version (fullgraph, static shapes).

        A small decode step is dominated by per-op overhead (hundreds of tiny ops around a few
        weight reads); compiling fuses them into a handful of kernels. Each new (batch, window,
        cache length) shape compiles once (about half a minute for GPT-B on a CPU), so this pays
        off for long sampling runs, not one-off images; speculative samplers compile once per window
        width (their window, then powers of two as an image ends: `covering_width`). Compiled and
        eager decoding sample the same tokens (tested for AR, SJD, MC-SJD and auto). Options go to
        `torch.compile`; `compile_step` compiles a sampler's own step the same way.

        The max-autotune modes freeze the weights into each graph (10-20 s per shape) and run every product
        through one GEMM family at every batch shape, so a row's logits stay the same bits at any batch size:
        - "max-autotune": ATen's kernels, oneDNN's packed GEMM in fp32 as in bf16 (inductor would pick MKL's
          for fp32; `OneDNNProducts` moves it), the FFN's w1 and w3 joined into one product (session 30:
          1.06-1.10x a step at batch 1, the same floats). default-c2i on an AMD EPYC (AVX-512, no AMX), 1 thread,
          batch 1 / 16 with CFG, ms a step: fp32 1.20 / 3.75 against "default"'s 1.87 / 5.11 and eager's
          3.29 / 6.54, bf16 0.77 / 2.22 against 1.07 / 2.69 (docs/history/decode.md, session 29).
        - "max-autotune-cpp": inductor's own C++ GEMM kernels, the fast mode at batch 1 and slow from batch 4:
          fp32 0.77 / 6.68, bf16 0.56 / 6.93.
        Inductor's own max-autotune times both families per product shape and keeps the faster; that mix is
        not offered, because the two sum a row in different orders and a seed's image would then depend on
        its batch (bf16: 0 of 16 images the same at batch 1 and 16; session 27). Compile after choosing the
        weight format.
        """
        if mode not in COMPILE_MODES:
            raise ArgenError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self._store_linears_column_major(False)
        options = {"fullgraph": True, "dynamic": False, **compile_options}
        inductor = {}
        if "mode" not in options and self.tok_embeddings.weight.device.type == "cpu":
            # inductor's C++ wrapper calls the step's kernels from C++ rather than from a generated
            # Python function: a small model's step is mostly that launch overhead (measured on
            # default-c2i, batch 1: 1.18 ms with the Python wrapper, 1.05 ms with this; eager 1.71)
            inductor["cpp_wrapper"] = True
        if mode in MAX_AUTOTUNE_GEMMS:
            # (no per-product table or choice summary on stderr: dozens of lines per shape around a CLI's output)
            inductor.update(max_autotune=True, max_autotune_gemm_backends=MAX_AUTOTUNE_GEMMS[mode],
                            autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
            if MAX_AUTOTUNE_GEMMS[mode] == "ATEN":
                # frozen products that read one input (the FFN's w1 and w3) run as one product on the joined
                # weights: a call saved, each element the same floats in fp32 and bf16 (default-c2i, batch 1
                # with CFG: 1.06-1.10x a step; docs/history/decode.md, session 30). Not for inductor's
                # own GEMMs: its bf16 kernel for the joined shape rounds otherwise (logits 0.05-0.13 apart).
                inductor["cpp.enable_concat_linear"] = True
                if torch.backends.mkldnn.is_available():
                    # ATen's fp32 products through oneDNN's packed kernel as its bf16 ones, not MKL's (1.2x a step)
                    inductor["post_grad_custom_post_pass"] = OneDNNProducts()
        if inductor:
            options["options"] = {**inductor, **options.get("options", {})}
        # one graph per (batch, window, position layout): a speculative sampler's shrinking
        # windows alone exceed dynamo's default of 8 recompiles, which fullgraph turns into an error
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 256)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)
        self.compiled_with = (options, mode in MAX_AUTOTUNE_GEMMS)
        self.decode = self.compile_step(type(self).decode.__get__(self))
        # the prefix's forward too: eager, it costs about five compiled steps (default-c2i, batch 1)
        self.prefix_logits = self.compile_step(type(self).prefix_logits.__get__(self))
        return self

    # ---- weight formats (an option of the model; samplers never see it) --------------------

    weight_formats = WEIGHT_FORMATS

    @property
    def weight_format(self) -> str:
        return getattr(self, "_weight_format", "fp32")

    def _linear_slots(self):
        """(parent, name) of every linear a decode step reads: the layers' and the output head."""
        for layer in self.layers:
            yield layer.attention, "wqkv"
            yield layer.attention, "wo"
            for name in ("w1", "w3", "w2"):
                yield layer.feed_forward, name
        yield self, "output"

    def decode_linears(self) -> list:
        """The linear modules one decode step runs, in order (what the decode benchmark's floor streams)."""
        return [getattr(parent, name) for parent, name in self._linear_slots()]

    def set_weight_format(self, fmt: str) -> "GPT":
        """Store the decode-step linears as `fmt` ("fp32", "fp32-packed", "bf16" or weight-only
        "int8"; see `argen.models.quant`). In place, once, from fp32 weights, for inference: norms,
        embeddings, attention, the KV cache and the logits stay float32. The condition embedder
        (run once per image at prefill) is left alone. "auto" picks fp32-packed for a model large
        enough to gain from it on CPU (`auto_weight_format`), fp32 otherwise."""
        check_weight_format(fmt, allow_auto=True)
        if fmt == "auto":
            if self.weight_format != "fp32":
                return self
            fmt = auto_weight_format(self.decode_linears())
        if fmt == self.weight_format:
            return self
        if self.weight_format != "fp32":
            raise ArgenError(f"weights are already {self.weight_format}; load the model again to change format")
        if self.tok_embeddings.weight.dtype != torch.float32:
            raise ArgenError("weight formats convert a float32 model; this one is "
                             f"{self.tok_embeddings.weight.dtype}")
        self._store_linears_column_major(False)
        convert_linears(list(self._linear_slots()), fmt)
        self._weight_format = fmt
        return self.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _fit_caption_projection(embedder, feats, labels, class_table, steps: int, batch: int = 1024) -> float:
    """Least-squares fit (Adam) of the caption MLP: caption features -> their class's embedding row;
    the unconditional caption -> the null row (the last one). Returns the final mean squared error."""
    null = embedder.uncond_embedding[:1].detach()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(embedder.cap_proj.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    for step in range(steps):  # a few seconds: a 2-layer MLP on cached features
        pick = torch.randint(len(feats), (batch,), generator=gen)
        x = torch.cat([feats[pick], null.expand(batch // 10, -1)])
        y = torch.cat([class_table[labels[pick]], class_table[-1:].expand(batch // 10, -1)])
        loss = F.mse_loss(embedder.cap_proj(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    return round(float(loss.detach()), 6)
