"""Grouped speculative decoding (GSD; So et al., ICCV 2025). Lossy; G=1 is SJD exactly.

The SJD loop with one change, the acceptance test of a draft x at a target row p (draft
distribution q), in `grouped_ratio`:

* group W: x and its neighbours in the rank order of p, G//2 just below x and G-1-G//2 just
  above (the reference code's window is 7 below and 6 above, G=14). Found with two top-k's of
  size <= G/2 over masked probabilities, never a sort of the vocabulary;
* filters, both must hold for y in W (x always passes): |p(y) - p(x)| < prob_threshold and
  ||E[y] - E[x]||^2 below the `embed_quantile` quantile of squared distances between random
  token pairs of E, the generator's `token_embeddings()` or the tokenizer's codebook (a
  threshold in units of the table's own distance distribution, so it carries over between
  tables of any scale and dimension);
* accept x (and emit x itself) iff u < sum_W' p / sum_W' q over the same kept set W'. A draft
  with p(x) = 0 (outside top-k/top-p) is never accepted.

Rejection, residual, bonus and Jacobi update are SJD's (token level).

Thresholds. The reference uses |dp| < 0.15 and squared L2 < 0.5 on Lumina-mGPT's input
embeddings; an absolute distance is tied to one table's scale and dimension (on the shipped
default-c2i generator, 0.5 is above the 99% quantile of its tok_embeddings distances, so it would
filter nothing). The probability threshold is scale-free and kept at 0.15. The embedding one is a
quantile of the table's own pair distances, tuned on default-c2i (cfg 2.0, G=10, 200-300
samples): step compression against the drift of the mean teacher-forced token log-likelihood
(lossless samplers stay within +-0.05 nats of AR) and classifier FID / class accuracy (flat within
noise). Quantile 0.2 (model embeddings) gave 2.50x for a 0.07-nat drift, 0.35 gave 2.61x / 0.10,
no filters 2.77x / 0.16 (SJD: 2.06x); 0.2 is the default. A VQ codebook (8-d, l2-normalised)
behaves like the model embeddings at the same quantile (2.55x / 0.07).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..checks import check_number
from ..errors import ArgenError
from .sjd import SJDSampler
from .speculative import gather_last


def embedding_threshold(embed: torch.Tensor, quantile: float, pairs: int = 20000) -> float:
    """The `quantile` of squared L2 distances between random distinct rows of embed [V, D]
    (fixed pairs, so the threshold is reproducible)."""
    vocab = embed.shape[0]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (pairs,), generator=g)
    b = (a + torch.randint(1, vocab, (pairs,), generator=g)) % vocab
    e = embed.detach().float()
    a, b = a.to(e.device), b.to(e.device)
    return float(torch.quantile(((e[a] - e[b]) ** 2).sum(-1), quantile))


def rank_neighbours(p: torch.Tensor, x: torch.Tensor, below: int, above: int):
    """Tokens next to x in the order of p (ties broken by id): ids [..., below + above] and
    whether each exists."""
    px = gather_last(p, x)[..., None]
    ids = torch.arange(p.shape[-1], device=p.device)
    below, above = min(below, p.shape[-1] - 1), min(above, p.shape[-1] - 1)
    xs = x[..., None]
    parts = []
    if below:
        lower = (p < px) | ((p == px) & (ids < xs))
        vals, idx = torch.where(lower, p, float("-inf")).topk(below, dim=-1, largest=True)
        parts.append((idx, torch.isfinite(vals)))
    if above:
        upper = (p > px) | ((p == px) & (ids > xs))
        vals, idx = torch.where(upper, p, float("inf")).topk(above, dim=-1, largest=False)
        parts.append((idx, torch.isfinite(vals)))
    return torch.cat([i for i, _ in parts], -1), torch.cat([v for _, v in parts], -1)


def grouped_ratio(p, q, x, group_size: int, prob_threshold: float,
                  embed: Optional[torch.Tensor], embed_threshold: float) -> torch.Tensor:
    """sum_W' p / sum_W' q for each draft x [B, S] (p, q: [B, S, V]); see the module doc."""
    group, keep = x[..., None], torch.ones_like(x, dtype=torch.bool)[..., None]
    if group_size > 1:
        below = group_size // 2
        ids, exists = rank_neighbours(p, x, below, group_size - 1 - below)
        group, keep = torch.cat([group, ids], -1), torch.cat([keep, exists], -1)
    p_group, q_group = p.gather(-1, group), q.gather(-1, group)
    if group_size > 1:
        px = p_group[..., :1]
        keep = keep & ((p_group - px).abs() < prob_threshold)
        if embed is not None:
            dist = (embed[group] - embed[x][..., None, :]).pow(2).sum(-1)
            keep = keep & (dist < embed_threshold)
        keep[..., 0] = True
    ratio = (p_group * keep).sum(-1) / (q_group * keep).sum(-1)
    return torch.where(p_group[..., 0] > 0, ratio, torch.zeros_like(ratio))


class GSDSampler(SJDSampler):
    """GSDSampler(group_size=10, prob_threshold=0.15, embed_quantile=0.2, embeddings="model",
    window=16, init="random").

    embeddings: "model" (the generator's token embeddings), "codebook" (the tokenizer's
    `codebook_embeddings()`, handed over by `prepare(tokenizer=...)`), a [V, D] tensor, or
    "none" / None (probability filter only). embed_quantile q in (0, 1]: a neighbour passes
    when its squared distance to the draft is below the q-quantile of the distances between
    random token pairs of that table (1.0 turns the filter off).
    """

    name = "gsd"
    option_aliases = {"L": "window", "G": "group_size"}

    def __init__(self, group_size: int = 10, prob_threshold: float = 0.15, embed_quantile: float = 0.2,
                 embeddings: Union[str, None, torch.Tensor] = "model", window: int = 16, init: str = "random"):
        super().__init__(window=window, init=init)
        group_size = check_number("group_size (G)", group_size, 1, None, integer=True)
        prob_threshold = check_number("prob_threshold", prob_threshold, 0, None, lo_open=True)
        embed_quantile = check_number("embed_quantile", embed_quantile, 0, 1, lo_open=True)
        if not (embeddings is None or isinstance(embeddings, torch.Tensor)
                or (isinstance(embeddings, str) and embeddings in ("model", "codebook", "none"))):
            raise ArgenError(f"embeddings must be 'model', 'codebook', 'none', None or a [V, D] tensor, got {embeddings!r}")
        self.group_size, self.prob_threshold, self.embed_quantile = group_size, prob_threshold, embed_quantile
        self.embeddings = None if isinstance(embeddings, str) and embeddings == "none" else embeddings

    def __repr__(self) -> str:
        source = self.embeddings if self.embeddings is None or isinstance(self.embeddings, str) else "tensor"
        return (f"GSDSampler(group_size={self.group_size}, prob_threshold={self.prob_threshold}, "
                f"embed_quantile={self.embed_quantile}, embeddings={source!r}, window={self.window}, "
                f"init={self.init!r})")

    def prepare(self, tokenizer=None, **components) -> "GSDSampler":
        """embeddings="codebook": take the tokenizer's code vectors, or behind a refiner (whose inputs are the
        generator's tokens, e.g. CTF coarse labels) the refiner's input embeddings."""
        if isinstance(self.embeddings, str) and self.embeddings == "codebook":
            refiner = components.get("refiner")
            if refiner is not None:
                # the generator's tokens are the refiner's inputs (e.g. CTF coarse labels), not codes
                self.codebook = refiner.input_embeddings()
            elif tokenizer is not None:
                self.codebook = tokenizer.codebook_embeddings()
        return self

    def context(self, model) -> dict:
        if self.group_size == 1 or self.embed_quantile >= 1 or self.embeddings is None:
            return {"embed": None, "threshold": float("inf")}
        if isinstance(self.embeddings, str):
            embed = model.token_embeddings() if self.embeddings == "model" else getattr(self, "codebook", None)
            if embed is None:
                source = "generator has no token embeddings" if self.embeddings == "model" else \
                    ("tokenizer has no codebook (or none was handed over with prepare(tokenizer=...)), or the "
                          "refiner that reads the generator's tokens gives no input_embeddings()")
                raise ArgenError(f"GSD embeddings={self.embeddings!r}: the {source}; use embeddings=none")
        else:
            embed = self.embeddings
        vocab = model.vocab_size
        if embed.dim() != 2 or embed.shape[0] < vocab:
            raise ArgenError(f"GSD embeddings must be [V >= {vocab}, D], got {tuple(embed.shape)}")
        own = model.token_embeddings()
        embed = embed.detach()[:vocab].float().to(own.device if own is not None else embed.device)
        return {"embed": embed, "threshold": embedding_threshold(embed, self.embed_quantile)}

    def accept_ratio(self, p, q, drafts, ctx) -> torch.Tensor:
        return grouped_ratio(p, q, drafts, self.group_size, self.prob_threshold, ctx["embed"], ctx["threshold"])
