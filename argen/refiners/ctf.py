"""Coarse-to-fine (CTF) prediction (Guo, Zhang, Shieh, arXiv 2503.16194): the refiner stage.

The tokenizer's codebook is clustered with k-means (`coarse_labels`); a generator samples only the
cluster id (coarse label) of every position, and `CTFRefiner` predicts every fine code in one
forward pass of a bidirectional transformer that reads the whole coarse sequence and the class.

    code_to_cluster [V]               saved in the refiner's weights (a persistent buffer)
    logits(coarse [B, n], cond [B])   -> fine-code logits [B, n, V], one pass
    refine(coarse, cond, seeds=...)   -> codes [B, n]: temperature, optionally restricted to the
                                         codes of each position's cluster; image i draws only
                                         from seeds[i]; with `guidance` g > 1 (a refiner trained
                                         with class dropout) from null + g * (class - null)
    compile_pass()                    torch.compile the network and the cluster mask (--compile)

The transformer reuses the generator's blocks (`argen.models.gpt`): the same RoPE, RMSNorm,
attention and SwiGLU feed-forward, called with a full (non-causal) attention mask.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..errors import ArgenError
from ..models.base import COMPILE_MODES
from ..models.gpt import GPTConfig, LabelEmbedder, RMSNorm, TransformerBlock, rope_factors, rope_table_1d, rope_table_2d
from ..models.pretrained import PretrainedMixin
from ..registry import register
from ..samplers.logits import SamplingParams, apply_cfg
from ..samplers.rng import sample_rows
from .base import Refiner

# Mixed into each image seed so the refiner's uniforms are not the very numbers the generator's
# stream for the same seed drew for its first positions (coarse and fine draws would correlate).
_SEED_SALT = 0x5DEECE66D


def coarse_labels(embeddings: torch.Tensor, num_clusters: int, seed: int = 0, normalize: bool = False,
                  n_init: int = 4) -> torch.Tensor:
    """Cluster id of every code [V] (int64) by scikit-learn k-means over code vectors [V, D].

    `normalize`: L2-normalise the vectors first (for tokenizers that compare normalised codes;
    default-vq's codebook is already normalised, so it changes nothing there). Deterministic for
    a seed: sklearn's k-means++ init and Lloyd iterations draw only from `random_state`. Cluster
    ids are renumbered by their smallest code so the labels do not depend on sklearn's order.
    """
    from sklearn.cluster import KMeans

    if embeddings is None:
        raise ArgenError("this tokenizer has no codebook embeddings to cluster (coarse labels need them)")
    if embeddings.dim() != 2:
        raise ArgenError(f"codebook embeddings must be [V, D], got {tuple(embeddings.shape)}")
    vocab = embeddings.shape[0]
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or not 2 <= num_clusters <= vocab:
        raise ArgenError(f"number of clusters must be an integer in 2..{vocab} (the codebook size), got {num_clusters!r}")
    x = embeddings.detach().double()
    if normalize:
        x = F.normalize(x, dim=-1)
    km = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=int(seed)).fit(x.cpu().numpy())
    raw = np.asarray(km.labels_, dtype=np.int64)
    used = np.unique(raw)
    if len(used) != num_clusters:  # k-means on duplicated code vectors can leave a cluster empty
        raise ArgenError(f"k-means found only {len(used)} distinct clusters among {vocab} codes; use fewer than "
                         f"{num_clusters} clusters")
    first = {c: int(np.flatnonzero(raw == c)[0]) for c in used}
    order = sorted(used, key=lambda c: first[c])
    rename = np.empty(num_clusters, dtype=np.int64)
    rename[order] = np.arange(num_clusters)
    return torch.from_numpy(rename[raw])


@register
class CTFRefiner(Refiner, PretrainedMixin, ModelMixin, ConfigMixin):
    """Bidirectional transformer: coarse labels + class -> fine-code logits at every position."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_clusters: int = 64, vocab: int = 1024, tokens: int = 64, grid: Optional[list] = None,
                 dim: int = 256, n_layer: int = 4, n_head: int = 4, num_classes: int = 10, dropout: float = 0.0,
                 temperature: float = 1.0, restrict: bool = True, kmeans_seed: int = 0, normalized: bool = False,
                 class_dropout_prob: float = 0.0, guidance: float = 1.0):
        super().__init__()
        if not 2 <= num_clusters <= vocab:
            raise ArgenError(f"num_clusters must be in 2..{vocab}, got {num_clusters}")
        # The blocks read their sizes from a GPTConfig; block_size/grid drive the RoPE table only.
        self.blocks_config = GPTConfig(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab, block_size=tokens,
                                       grid_size=tuple(grid) if grid is not None else None,
                                       rope_type="2d" if grid is not None else "1d", num_classes=num_classes,
                                       class_dropout_prob=0.0, token_dropout_p=dropout, resid_dropout_p=dropout,
                                       ffn_dropout_p=dropout, multiple_of=64)
        cfg = self.blocks_config
        # class dropout in training gives the null class a row, which guidance needs
        self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.coarse_embeddings = nn.Embedding(num_clusters, dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, 0.0) for _ in range(n_layer))
        self.norm = RMSNorm(dim, eps=cfg.norm_eps)
        self.output = nn.Linear(dim, vocab, bias=False)
        table = (rope_table_2d(cfg.grid, cfg.head_dim, cfg.rope_base, 1) if grid is not None
                 else rope_table_1d(tokens, cfg.head_dim, cfg.rope_base, 1))
        self.register_buffer("rope", table, persistent=False)
        # The k-means assignment travels with the weights (persistent, integer: never cast to fp16).
        self.register_buffer("code_to_cluster", torch.arange(vocab) % num_clusters)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.initializer_range)
        # Sampling settings: start from the config, may be changed on a loaded model.
        self.temperature = float(temperature)
        self.restrict = bool(restrict)
        self.guidance = 1.0
        self.set_sampling(guidance=guidance)
        self._compiled_scores = None  # `scores` compiled by compile_pass

    # ---- refiner contract -----------------------------------------------------------------

    in_vocab_size = property(lambda self: self.config.num_clusters)
    vocab_size = property(lambda self: self.config.vocab)
    num_tokens = property(lambda self: self.config.tokens)

    def set_clusters(self, code_to_cluster: torch.Tensor) -> "CTFRefiner":
        c2c = torch.as_tensor(code_to_cluster, dtype=torch.long)
        if c2c.shape != (self.config.vocab,):
            raise ArgenError(f"cluster assignment must have one entry per code ({self.config.vocab}), "
                             f"got {tuple(c2c.shape)}")
        if int(c2c.min()) < 0 or int(c2c.max()) >= self.config.num_clusters:
            raise ArgenError(f"cluster ids must be in 0..{self.config.num_clusters - 1}")
        if len(torch.unique(c2c)) != self.config.num_clusters:
            raise ArgenError("every cluster must hold at least one code")
        self.code_to_cluster.copy_(c2c.to(self.code_to_cluster.device))
        return self

    def codes_to_coarse(self, codes: torch.Tensor) -> torch.Tensor:
        """Fine codes [..] -> their coarse labels (training data for both stages)."""
        return self.code_to_cluster[codes.long()]

    def input_embeddings(self) -> torch.Tensor:
        """[K, dim] vectors of the coarse labels (for samplers that compare tokens, e.g. GSD)."""
        return self.coarse_embeddings.weight

    def set_sampling(self, temperature: Optional[float] = None, restrict: Optional[bool] = None,
                     guidance: Optional[float] = None) -> "CTFRefiner":
        if guidance is not None:
            if isinstance(guidance, bool) or not (isinstance(guidance, (int, float)) and 1 <= guidance < float("inf")):
                raise ArgenError(f"refiner guidance must be a number >= 1 (1 = off), got {guidance!r}")
            if guidance != 1 and not self.cls_embedding.has_null:
                raise ArgenError("this refiner was trained without class dropout, so it has no unconditional "
                                 "class to guide against; use guidance 1")
            self.guidance = float(guidance)
        if temperature is not None:
            if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
                raise ArgenError(f"refiner temperature must be a number >= 0, got {temperature!r}")
            self.temperature = float(temperature)
        if restrict is not None:
            self.restrict = bool(restrict)
        return self

    # ---- the network ----------------------------------------------------------------------

    def _check(self, coarse: torch.Tensor, cond: torch.Tensor) -> None:
        n, k = self.config.tokens, self.config.num_clusters
        if coarse.dim() != 2 or coarse.shape[1] != n or coarse.is_floating_point():
            raise ArgenError(f"the refiner takes integer coarse labels [B, {n}], got {tuple(coarse.shape)} {coarse.dtype}")
        if coarse.numel() and (int(coarse.min()) < 0 or int(coarse.max()) >= k):
            raise ArgenError(f"coarse label out of range: valid labels are 0..{k - 1}")
        if cond.dim() != 1 or cond.is_floating_point() or cond.shape[0] != coarse.shape[0]:
            raise ArgenError(f"the CTF refiner takes class ids [B={coarse.shape[0]}] as its condition, got "
                             f"{tuple(cond.shape)} {cond.dtype}")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.config.num_classes):
            raise ArgenError(f"class id out of range for the refiner: valid ids are 0..{self.config.num_classes - 1}")

    def forward(self, coarse: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Fine-code logits [B, n, V] (float32) for coarse labels [B, n] and class ids [B]."""
        self._check(coarse, cond)
        return self._network(coarse, cond)

    def _network(self, coarse: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_embedding(cond), self.coarse_embeddings(coarse)], dim=1)
        length = x.shape[1]
        rope = rope_factors(self.rope[:length])
        # Every position sees every other (bidirectional): a full boolean mask, since the blocks
        # are causal when given none.
        full = torch.ones(length, length, dtype=torch.bool, device=x.device)
        for layer in self.layers:
            x = layer(x, rope, full)
        return self.output(self.norm(x[:, 1:])).float()

    def scores(self, coarse: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The logits `refine` samples from [B, n, V] (restricted to each position's cluster when
        `restrict`), for checked inputs: what `compile_pass` compiles."""
        if self.guidance == 1:
            logits = self._network(coarse, cond)
        else:  # classifier-free guidance: conditional and null-class rows in one pass
            null = torch.full_like(cond, self.config.num_classes)
            both = self._network(torch.cat([coarse, coarse]), torch.cat([cond, null]))
            logits = apply_cfg(both, SamplingParams(cfg_scale=self.guidance), self.guidance)
        return self.restricted(logits, coarse) if self.restrict else logits

    def compile_pass(self, mode: str = "default") -> "CTFRefiner":
        """torch.compile `scores` (static shapes: one graph per batch size). The pass is a few large
        products plus ~200 small ops; fused, it takes 49 against 82 ms for 16 images in bf16 on an
        AMD EPYC (docs/history/ctf.md, session 20). Every mode compiles alike: inductor's
        timed GEMM choice (max-autotune) gained 4% more there for twice the compile time."""
        if mode not in COMPILE_MODES:
            raise ArgenError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self._compiled_scores = torch.compile(self.scores, fullgraph=True, dynamic=False)
        return self

    def loss(self, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all fine codes given their ground-truth coarse labels."""
        logits = self(self.codes_to_coarse(codes), cond)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1).long())

    def restricted(self, logits: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Logits with every code outside its position's cluster set to -inf."""
        # one [K, V] table of "code outside cluster", looked up per position: a single pass over the
        # [B, n, V] logits' worth of booleans where comparing and inverting took two
        outside = torch.arange(self.config.num_clusters, device=coarse.device)[:, None] != self.code_to_cluster
        return logits.masked_fill(outside[coarse], float("-inf"))

    @torch.no_grad()
    def refine(self, tokens: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None, *,
               seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        if cond_mask is not None:
            raise ArgenError("the CTF refiner is class-conditional: it takes no caption mask")
        tokens = tokens.to(self.code_to_cluster.device)
        cond = cond.to(self.code_to_cluster.device)
        self._check(tokens, cond)
        logits = (self._compiled_scores or self.scores)(tokens, cond)
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits if self.temperature == 1 else logits / self.temperature, dim=-1)  # x / 1 == x
        if seeds is None:
            u = torch.rand(tokens.shape, dtype=torch.float64)
        else:
            if len(seeds) != tokens.shape[0]:
                raise ArgenError(f"got {len(seeds)} seeds for a batch of {tokens.shape[0]}")
            u = torch.stack([torch.rand(tokens.shape[1], dtype=torch.float64,
                                        generator=torch.Generator().manual_seed((int(s) ^ _SEED_SALT) % 2**63))
                             for s in seeds])
        return sample_rows(probs, u.to(probs.device))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
