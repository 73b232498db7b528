"""Token-Shuffle generator (Ma et al., arXiv 2504.17789): one transformer position per s x s window.

No official code exists; this follows the paper's description (`shared/docs/tokenizers_ctf_shuffle.md`
§5). For a code grid of R x C and window side s:

* token-shuffle: each code of a window is embedded (`tok_embeddings`, d), compressed d -> d/s²
  by one shared linear layer, the s² parts are concatenated (window raster order) to d, and
  `shuffle_mlp_blocks` residual MLP blocks (`shuffle_mlp_kind`: SwiGLU with a pre-norm, or plain) mix them;
* the LlamaGen transformer (`argen.models.gpt` blocks, reused) runs over the (R/s) x (C/s) grid of
  windows with 2D RoPE over that grid, after the condition prefix exactly as in `GPT`;
* token-unshuffle: `shuffle_mlp_blocks` residual MLP blocks, a split into s² parts of d/s²,
  one shared linear expansion of each part to d, the final norm and the shared output head,
  giving s² logits per position.

The s² codes of a window are predicted from the same hidden state, so they are conditionally
independent given the prefix (what the speculative samplers rely on at k = s²). Training is
cross-entropy over every original code.

With s = 1 there is nothing to shuffle: no compress/expand/MLP modules exist, the state dict is
the plain GPT's, and logits and sampled tokens are GPT's (tested).

Orders. A sampler emits tokens position-major: window (i, j) of the window grid in raster order,
then its s² codes in raster order inside the window. The tokenizer reads codes in raster order over
the full R x C grid; `tokens_to_codes` / `codes_to_tokens` map between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArgenError
from ..registry import register
from .base import weights_key
from .cache import KVCache
from .gpt import GPT, FeedForward, GPTConfig, RMSNorm, rope_factors, rope_table_2d
from .quant import BatchInvariantLinear, batch_invariant, float_weight, weight_format_of


@dataclass
class TokenShuffleConfig(GPTConfig):
    """A `GPTConfig` whose `block_size` / `grid_size` describe the tokenizer's code grid, plus the
    window side `shuffle` (s) and the number of residual MLP blocks on each side."""

    shuffle: int = 2
    shuffle_mlp_blocks: int = 2
    # hidden width of those blocks' SwiGLU; None: the transformer's own FFN width. The blocks run at
    # every step beside only n_layer transformer layers, so on a small model full-width blocks cost
    # as much as a layer each (docs/history/token-shuffle.md, "Session 25")
    shuffle_mlp_hidden: Optional[int] = None
    # what a block is: "swiglu", x + SwiGLU(RMSNorm(x)) (LlamaGen's feed-forward, three products); or
    # "plain", x + W2 silu(W1 x) (two products, no norm). At batch 1 a step is op overhead, and a plain block
    # per side made default-c2i's step 1.07x dearer in shuffle-c2i instead of 1.12-1.13x (session 40).
    shuffle_mlp_kind: str = "swiglu"

    def __post_init__(self):
        super().__post_init__()
        s = self.shuffle
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ArgenError(f"shuffle must be an integer >= 1, got {s!r}")
        if isinstance(self.shuffle_mlp_blocks, bool) or not isinstance(self.shuffle_mlp_blocks, int) \
                or self.shuffle_mlp_blocks < 0:
            raise ArgenError(f"shuffle_mlp_blocks must be an integer >= 0, got {self.shuffle_mlp_blocks!r}")
        h = self.shuffle_mlp_hidden
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ArgenError(f"shuffle_mlp_hidden must be an integer >= 1 or None, got {h!r}")
        if self.shuffle_mlp_kind not in MLP_KINDS:
            raise ArgenError(f"shuffle_mlp_kind must be one of {', '.join(MLP_KINDS)}, got {self.shuffle_mlp_kind!r}")
        grid = self.grid
        if grid is None:
            raise ArgenError("token-shuffle needs a 2D code grid (rope_type '2d'); 1D tokenizers have no windows")
        if grid[0] % s or grid[1] % s:
            raise ArgenError(f"shuffle s={s} does not divide the {grid[0]}x{grid[1]} code grid")
        if self.dim % (s * s):
            raise ArgenError(f"dim={self.dim} is not divisible by s²={s * s} (each code gets dim/s² channels)")

    @property
    def window_grid(self) -> tuple:
        """(rows, cols) of transformer positions: the code grid divided by s."""
        return (self.grid[0] // self.shuffle, self.grid[1] // self.shuffle)

    @property
    def num_windows(self) -> int:
        return self.block_size // (self.shuffle * self.shuffle)

    @property
    def seq_len(self) -> int:
        return self.cls_token_num + self.num_windows


class ResidualMLP(nn.Module):
    """x + SwiGLU(RMSNorm(x)): the LlamaGen feed-forward block (reused, `hidden` wide) with its own pre-norm."""

    def __init__(self, config: GPTConfig, hidden: Optional[int] = None):
        super().__init__()
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config, hidden)

    def forward(self, x):
        return x + self.feed_forward(self.norm(x))


class PlainResidualMLP(nn.Module):
    """x + W2 silu(W1 x): a residual MLP block of two products and nothing else (`shuffle_mlp_kind` "plain")."""

    def __init__(self, config: GPTConfig, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or config.ffn_hidden_dim
        self.w1 = BatchInvariantLinear(config.dim, hidden, bias=False)
        self.w2 = BatchInvariantLinear(hidden, config.dim, bias=False)

    def forward(self, x):
        rows = x.numel() // x.shape[-1]  # padded once around both products, as `FeedForward` does
        return x + batch_invariant(self._mlp, x.reshape(rows, -1)).reshape(x.shape)

    def _mlp(self, x):
        return self.w2(F.silu(self.w1(x)))


MLP_KINDS = {"swiglu": ResidualMLP, "plain": PlainResidualMLP}


@register
class TokenShuffleGPT(GPT):
    """LlamaGen GPT over s x s windows of codes: k = s² codes per position (see the module docstring).

    Build with `TokenShuffleGPT(TokenShuffleConfig(...))` or `TokenShuffleGPT(shuffle=2, dim=..., ...)`.
    """

    def __init__(self, config: Optional[TokenShuffleConfig] = None, **config_fields):
        cfg = config if config is not None else TokenShuffleConfig.from_dict(config_fields)
        if not isinstance(cfg, TokenShuffleConfig):
            raise ArgenError("TokenShuffleGPT takes a TokenShuffleConfig")
        super().__init__(cfg)  # the GPT modules, with the RoPE table over the window grid
        s2 = cfg.shuffle * cfg.shuffle
        self.tokens_per_position = s2  # instance attribute: the contract's k
        if s2 > 1:
            part = cfg.dim // s2
            self.shuffle_compress = BatchInvariantLinear(cfg.dim, part)
            blocks, block = cfg.shuffle_mlp_blocks, MLP_KINDS[cfg.shuffle_mlp_kind]
            self.shuffle_mlp = nn.ModuleList(block(cfg, cfg.shuffle_mlp_hidden) for _ in range(blocks))
            self.unshuffle_mlp = nn.ModuleList(block(cfg, cfg.shuffle_mlp_hidden) for _ in range(blocks))
            self.unshuffle_expand = BatchInvariantLinear(part, cfg.dim)
            for module in (self.shuffle_compress, self.unshuffle_expand, self.shuffle_mlp, self.unshuffle_mlp):
                for m in module.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, std=cfg.initializer_range)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)

    def _rope_table(self) -> torch.Tensor:
        cfg = self.gpt_config
        return rope_table_2d(cfg.window_grid, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)

    # ---- structure ------------------------------------------------------------------------

    @property
    def shuffle(self) -> int:
        return self.gpt_config.shuffle

    @property
    def num_positions(self) -> int:
        return self.gpt_config.num_windows

    @property
    def grid(self) -> tuple:
        return self.gpt_config.window_grid

    # ---- orders ---------------------------------------------------------------------------

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, positions * s²] window-major -> [B, R * C] raster order of the code grid."""
        s = self.shuffle
        (rows, cols), b = self.gpt_config.grid, tokens.shape[0]
        return tokens.reshape(b, rows // s, cols // s, s, s).permute(0, 1, 3, 2, 4).reshape(b, rows * cols)

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, R * C] raster order -> [B, positions * s²] window-major (the inverse of tokens_to_codes)."""
        s = self.shuffle
        (rows, cols), b = self.gpt_config.grid, codes.shape[0]
        return codes.reshape(b, rows // s, s, cols // s, s).permute(0, 1, 3, 2, 4).reshape(b, rows * cols)

    # ---- shuffle / unshuffle --------------------------------------------------------------

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, k] (or [B, T] when k = 1) -> position inputs [B, T, d]."""
        k = self.tokens_per_position
        if k == 1:
            return self.tok_embeddings(tokens if tokens.dim() == 2 else tokens[..., 0])
        if tokens.dim() != 3 or tokens.shape[-1] != k:
            raise ArgenError(f"expected tokens [B, T, {k}], got {tuple(tokens.shape)}")
        if self.training or torch.is_grad_enabled():
            x = self.shuffle_compress(self.tok_embeddings(tokens))
        else:  # sampling: each code's compressed embedding, looked up (the folds below)
            x = F.embedding(tokens, self._compressed_table())
        x = x.flatten(-2)  # [B, T, k * d/k]
        for block in self.shuffle_mlp:
            x = block(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., d] -> float32 logits [..., k, V] (or [..., V] when k = 1)."""
        k = self.tokens_per_position
        if k == 1:
            return self.output(self.norm(x)).float()
        for block in self.unshuffle_mlp:
            x = block(x)
        parts = x.unflatten(-1, (k, -1))  # [..., k, d/k]
        if not (self.training or torch.is_grad_enabled()):
            return self._folded_head(parts)
        return self.output(self.norm(self.unshuffle_expand(parts))).float()

    # ---- the compress layer and the output head folded (sampling) --------------------------
    #
    # The compress layer is linear and reads one code's embedding: sampling looks up a [V, d/k] table of
    # compressed embeddings instead of running it, one product fewer per step. The table is that layer's
    # own product over the whole vocabulary (V rows, a multiple of 4), so each entry is the bits the step's
    # padded product gives (`BatchInvariantLinear`) and the logits are unchanged (tested). It has its own
    # key (three tensors), so a step checks each derived tensor against only the weights it is made of.
    #
    # Each code's logits are W_out (g * e / rms(e)) with e = W_e p + b the code's part p [d/k] expanded
    # to d: k expansions and k products with the [V, d] head per position, four times a plain GPT's
    # head at s = 2 and most of what kept a shuffled step dear (docs/history/token-shuffle.md, "Session
    # 25"). Nothing nonlinear sits between the expansion and the head but the norm's 1 / rms(e), a
    # scalar per code, and ||e||² = pᵀ (W_eᵀ W_e) p + 2 (W_eᵀ b)ᵀ p + bᵀ b is a d/k-sized quadratic form.
    # So sampling uses logits = ((W_out diag(g) W_e) p + W_out (g * b)) / rms(e): one [V, d/k] product
    # per code, a plain GPT's head cost per position. The same function of the weights; floats round
    # otherwise (logits within ~1e-5 of the unfolded head's, tested). Training keeps the unfolded path.
    # A converted head (`set_weight_format`: bf16, int8, fp32-packed) folds too, from the matrix it
    # multiplies by, into float32: the [V, d/k] fold is half the bytes of a bf16 [V, d] head, and
    # per-channel int8 on the folded matrix gave 2.5x the unfolded int8 head's logit error (measured).

    def _fold_key(self) -> tuple:
        return weights_key((*self.output.parameters(), *self.output.buffers(), self.norm.weight,
                            self.unshuffle_expand.weight, self.unshuffle_expand.bias))

    @torch.no_grad()
    def _refresh_fold(self) -> dict:
        """The folded head's tensors, rebuilt when a weight it is made of changed (an optimizer step, a
        load, a cast: `_fold_key`). Products in float64; the folded head in the head's dtype (float32
        for a converted head), the norm's quadratic form in float32 (the norm itself runs in float32)."""
        key = self._fold_key()
        fold = self.__dict__.get("_fold")
        if fold is None or fold["key"] != key:
            w_out, gain = float_weight(self.output).double(), self.norm.weight.double()
            w_e, b = self.unshuffle_expand.weight.double(), self.unshuffle_expand.bias.double()
            dtype = self.output.weight.dtype if weight_format_of(self.output) == "fp32" else torch.float32
            fold = {"key": key, "weight": ((w_out * gain) @ w_e).to(dtype), "bias": (w_out @ (gain * b)).to(dtype),
                    "gram": (w_e.T @ w_e).float(), "cross": (2 * w_e.T @ b).float(),
                    "const": float(b @ b)}
            self.__dict__["_fold"] = fold  # not a buffer: derived, never saved
        return fold

    @torch.no_grad()
    def _compressed_table(self) -> torch.Tensor:
        """[V, d/k]: the compress layer applied to every code's embedding, rebuilt when those weights change."""
        if torch.compiler.is_compiling():  # traced as it was at compile time (`compile_decode` refreshes it)
            return self.__dict__["_table"][1]
        key = weights_key((self.tok_embeddings.weight, self.shuffle_compress.weight, self.shuffle_compress.bias))
        cached = self.__dict__.get("_table")
        if cached is None or cached[0] != key:
            cached = (key, self.shuffle_compress(self.tok_embeddings.weight))
            self.__dict__["_table"] = cached  # not a buffer: derived, never saved
        return cached[1]

    def _folded_head(self, parts: torch.Tensor) -> torch.Tensor:
        # a compiled step traces the tensors as they were when it was compiled (`compile_decode` refreshes them)
        fold = self.__dict__["_fold"] if torch.compiler.is_compiling() else self._refresh_fold()
        # padded as every generator product; at s = 2 the k = 4 codes of each position need none
        logits = batch_invariant(lambda rows: self._folded_logits(rows, fold), parts.reshape(-1, parts.shape[-1]))
        return logits.reshape(*parts.shape[:-1], -1)

    def _folded_logits(self, rows: torch.Tensor, fold: dict) -> torch.Tensor:
        wide = rows.float()
        sq = (wide @ fold["gram"] * wide).sum(-1) + wide @ fold["cross"] + fold["const"]
        inv_rms = torch.rsqrt(sq / self.gpt_config.dim + self.norm.eps)
        return F.linear(rows.to(fold["weight"].dtype), fold["weight"], fold["bias"]).float() * inv_rms.unsqueeze(-1)

    def compile_decode(self, mode: str = "default", **compile_options) -> "TokenShuffleGPT":
        self._store_linears_column_major(False)  # the layout the compiled step traces (`GPT.compile_decode`)
        if self.tokens_per_position > 1:
            self._refresh_fold()
            self._compressed_table()
        return super().compile_decode(mode, **compile_options)

    # ---- teacher forcing ------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, cond: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for every position of ``[condition prefix ; windows]``: [B, cls + L, k, V]
        ([B, cls + L, V] when k = 1). `idx`: generator tokens [B, L * k] or [B, L, k];
        logits[:, cls_token_num - 1 + j] predicts the codes of window j."""
        k = self.tokens_per_position
        self._check_tokens(idx)
        self.check_condition(cond)
        tokens = idx.reshape(idx.shape[0], -1, k)
        x = torch.cat([self.embed_condition(cond), self.embed_tokens(tokens)], dim=1)
        x = self.tok_dropout(x)
        length = x.shape[1]
        if length > self.freqs_cis.shape[0]:
            raise ArgenError(f"sequence of {length} positions exceeds the model's {self.freqs_cis.shape[0]}")
        if mask is not None and mask.dim() == 2:
            mask = self.training_mask(mask, length)
        rope = rope_factors(self.freqs_cis[:length])
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.head(x)

    def loss(self, codes: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy over every original code (codes in the tokenizer's raster order)."""
        k = self.tokens_per_position
        tokens = self.codes_to_tokens(codes)
        logits = self(tokens[:, :-k], cond, cond_mask)[:, self.gpt_config.cls_token_num - 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    # ---- sampling contract ----------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> KVCache:
        return super().new_cache(batch_size, max_len or self.gpt_config.seq_len, device, dtype)

    def prefix_logits(self, cond: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The condition prefix's forward (`prefill`); logits [B, k, V] of the first window ([B, V] when k = 1)."""
        x = self._run_cached(self.embed_condition(cond), input_pos, cache)
        return self.head(x[:, -1])

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Tokens [B, T, k] (or [B, T] when k = 1) of windows at sequence positions `input_pos` ->
        logits [B, T, k, V] ([B, T, V]); row j predicts the window after input_pos[j]."""
        x = self._run_cached(self.embed_tokens(tokens), input_pos, cache)
        return self.head(x)

