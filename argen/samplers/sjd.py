"""Speculative Jacobi decoding (SJD; Teng et al., ICLR 2025). Lossless.

Per step (see `argen.samplers.speculative` for the window, cache and batching):

* acceptance: draft d with stored draft distribution q is accepted iff ``u < p(d) / q(d)``,
  p and q both processed distributions (`accept_ratio`);
* first rejection at row r: emit ``y ~ norm(relu(p_r - q_r))`` (residual, not re-filtered) and
  stop; all accepted: emit the bonus token sampled from the window's last row (`propose`);
* Jacobi update: every row j also draws ``y_j ~ p_j``; the rows after the emitted ones become
  the next drafts, each with q = the row it was drawn from (`propose` + `speculative.commit`).
"""

from __future__ import annotations

import torch

from .rng import sample_rows
from .speculative import SpeculativeSampler, residual, rows_at, token_ratio


class SJDSampler(SpeculativeSampler):
    """SJDSampler(window=16, init="random"): L tokens per forward; init "random", "left" or "above"."""

    name = "sjd"
    multi_code = True  # k codes per position: `speculative_codes` (each code tested on its own)

    def accept_ratio(self, p, q, drafts, ctx) -> torch.Tensor:
        return token_ratio(p, q, drafts)

    def propose(self, probs, q, drafts, accept, has_draft, n_acc, u_res, u_fresh) -> torch.Tensor:
        fresh = sample_rows(probs, u_fresh)  # Jacobi proposals, one per row
        width = probs.shape[1]
        if width == 1:
            return fresh
        offsets = torch.arange(width, device=probs.device)
        rejected = n_acc < has_draft.sum(-1)
        row = n_acc.clamp(max=width - 2)  # the rejected row (only used where rejected)
        fix = sample_rows(residual(rows_at(probs, row), rows_at(q, row)), u_res[:, 0])
        extra = torch.where(rejected, fix, fresh.gather(1, n_acc[:, None])[:, 0])
        kept = torch.cat([drafts, fresh[:, -1:]], dim=1)
        out = torch.where(offsets < n_acc[:, None], kept, fresh)
        return out.scatter(1, n_acc[:, None], extra[:, None])
