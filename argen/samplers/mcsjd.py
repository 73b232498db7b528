"""Speculative Jacobi decoding with maximally coupled drafts (MC-SJD, after SCD / So et al.). Lossless.

SJD redraws every later draft independently from its new row each step, so even a row whose
distribution barely changed gets a new token and the context after it keeps moving. Here the
next draft of a row that already had a draft d ~ q is drawn with a maximal coupling of q and the
new row p: keep d with probability min(1, p(d)/q(d)), otherwise draw from norm(relu(p - q)).
That is exactly the verification test, applied to every row, so verification and the Jacobi
update are one vectorised operation (`propose`): the emitted tokens are the coupled tokens up to
and including the first row where the coupling moved, the rest are the next drafts. The new
draft is still an exact sample of p (its stored q), so acceptance stays exact and the sampler
lossless; drafts persist while their distributions do, which lets longer windows pay off.

Measured (NFE per image, 64-token Fashion-MNIST generators, cfg 2.0): on default-c2i SJD L=16
needs 31.7 forwards (2.02x), this sampler 25.4 at L=16, 23.9 at L=32 (2.68x), 24.0 at L=64. The
other coupling, shared Gumbel noise per position (draft = argmax(log p + g)), was measured on a
proxy model and did no better (2.92x vs 2.94x at L=16, 3.27x vs 3.30x at L=32) while needing a
[B, L, V] noise state, so the maximal coupling is what ships.
"""

from __future__ import annotations

import torch

from .rng import sample_rows
from .speculative import SpeculativeSampler, residual, token_ratio


class MCSJDSampler(SpeculativeSampler):
    """MCSJDSampler(window=32, init="random")."""

    name = "mcsjd"
    multi_code = True
    coupled_drafts = True

    def __init__(self, window: int = 32, init: str = "random"):
        super().__init__(window=window, init=init)

    def accept_ratio(self, p, q, drafts, ctx) -> torch.Tensor:
        return token_ratio(p, q, drafts)

    def propose(self, probs, q, drafts, accept, has_draft, n_acc, u_res, u_fresh) -> torch.Tensor:
        out = sample_rows(probs, u_fresh)  # rows without a draft (bonus row, padding)
        width = probs.shape[1]
        if width == 1:
            return out
        moved = sample_rows(residual(probs[:, :-1], q), u_res[:, : width - 1])
        coupled = torch.where(accept, drafts, moved)
        out[:, :-1] = torch.where(has_draft, coupled, out[:, :-1])
        return out
