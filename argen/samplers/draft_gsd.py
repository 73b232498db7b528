"""Draft-model speculative decoding with GSD's grouped acceptance. Lossy; G=1 is `draft` exactly.

`draft`'s drafts (a small distilled drafter, `argen.samplers.draft`) tested with GSD's rule
(`argen.samplers.gsd.grouped_ratio`): a draft x is accepted iff u < sum_W' p / sum_W' q over x and
its kept neighbours in the target's rank order, instead of u < p(x) / q(x). Image tokens have many
near-equivalent neighbours, so a drafter that is close to the target but not exact gets many more
of its drafts through; emission, residual and bonus stay SJD's, so only the acceptance test trades
exactness for longer accepted runs. The two methods compose without new code: the drafts come
from `DraftSampler`, the test from a `GSDSampler` held inside, which also resolves its embeddings
(the generator's, or the tokenizer's codebook handed over by `prepare`).
"""

from __future__ import annotations

from typing import Union

import torch

from .draft import DraftSampler
from .gsd import GSDSampler


class GroupedDraftSampler(DraftSampler):
    """GroupedDraftSampler(window=6, group_size=10, prob_threshold=0.15, embed_quantile=0.2,
    embeddings="model", stop=0.0): `draft` with GSD's test (options as `GSDSampler`'s and, for
    `stop`, `DraftSampler`'s)."""

    name = "draft-gsd"
    option_aliases = {"L": "window", "G": "group_size"}

    def __init__(self, window: int = 6, group_size: int = 10, prob_threshold: float = 0.15,
                 embed_quantile: float = 0.2, embeddings: Union[str, None, torch.Tensor] = "model",
                 stop: float = 0.0):
        super().__init__(window=window, stop=stop)
        self.grouped = GSDSampler(group_size, prob_threshold, embed_quantile, embeddings, window=window)

    def __repr__(self) -> str:
        g = self.grouped
        source = g.embeddings if g.embeddings is None or isinstance(g.embeddings, str) else "tensor"
        return (f"GroupedDraftSampler(window={self.window}, group_size={g.group_size}, prob_threshold="
                f"{g.prob_threshold}, embed_quantile={g.embed_quantile}, embeddings={source!r}, stop={self.stop})")

    def prepare(self, **components) -> "GroupedDraftSampler":
        super().prepare(**components)
        self.grouped.prepare(**components)
        return self

    def context(self, model) -> dict:
        return self.grouped.context(model)

    def accept_ratio(self, p, q, drafts, ctx) -> torch.Tensor:
        return self.grouped.accept_ratio(p, q, drafts, ctx)
