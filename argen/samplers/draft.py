"""Speculative decoding with a small draft model (Leviathan et al. 2023; Chen et al. 2023). Lossless.

A drafter, a smaller generator over the same codes and conditions, proposes the next L-1 tokens
one by one from its own processed distributions q (the shared `logits_to_probs`: the same CFG,
guidance schedule, temperature and filters as the target); the target verifies all of them in one
forward (`argen.samplers.speculative`: window, ragged rows, per-sample streams). Draft d_j is
accepted with probability min(1, p_j(d_j) / q_j(d_j)); the first rejected row emits a token of
norm(relu(p - q)), a fully accepted window emits a bonus token from p. That is SJD's test and
emission (`SJDSampler.accept_ratio` / `propose`), so this sampler reuses them; only the drafts
differ: SJD's Jacobi drafts (the target's rows from the previous forward) are replaced, every
step, by the drafter's.

The drafter keeps its own KV cache, laid out like the target's (condition, then image token k at
condition length + k). After every target forward both are rewound to the same committed prefix.
The drafter has never seen the newest committed token, and when the whole window was accepted
not the last draft either, so each drafting pass starts with a two-token forward
[x_{e-2}, x_{e-1}] (re-writing x_{e-2}'s keys is harmless: a key is addressed by position), then
feeds each new draft. Rows near the end of the image pad at the spare last position, which no real
query sees (as the target's window does).

Early stop (`draft:L=24,stop=0.3`): a row stops drafting its window after the first draft whose
own guided probability q_j(d_j) is below `stop`; that draft is still verified, the target's window
for the row shrinks to the drafts made plus the bonus row, and the drafter saves the forwards it
would have spent on the rest of the window. Still lossless (see `init_drafts`).

NFE counts target forwards only (`num_forward_passes`, `forwards_per_sample`); the drafter's calls
are counted apart in `SamplerOutput.draft_forward_passes`. The drafter comes from
`prepare(draft=...)`: the pipeline hands over the generator named `"drafter"` in its
`pipeline.json` (`ARPipeline`); `argen ... --drafter FOLDER` overrides it. That plumbing is
`DrafterMixin`, shared by every draft-model sampler (`draft-gsd`, `draft-pac`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import check_number
from ..errors import ArgenError
from .base import SamplerOutput, cfg_batch
from .logits import SamplingParams, logits_to_probs
from .rng import sample_rows
from .sjd import SJDSampler
from .speculative import Window, cfg_rows, guidance

MISSING_DRAFTER = ("sampler '{name}' needs a draft model: name a small generator trained on the same codes as "
                   "\"drafter\" in the model's pipeline.json (a folder beside it or a shipped name), or pass "
                   "--drafter FOLDER")


@dataclass
class DraftRun:
    """The drafter's state during one sampling call."""

    model: object
    cache: object
    cond_len: int
    num_tokens: int
    params: SamplingParams
    forwards: int = 0  # drafter calls, prefill included
    row_forwards: Optional[torch.Tensor] = None  # [B]: the drafter calls each row needed (prefill included)
    accepted: int = 0  # drafts accepted (summed over rows)
    tested: int = 0  # drafts tested: the accepted ones plus the first rejected one of each row and step
    drafted: Optional[torch.Tensor] = None  # [B]: drafts made for each row's next window
    fed: Optional[tuple] = None  # draft-pac: (image index of the first fed draft [B], the fed drafts [B, k])


class DrafterMixin:
    """What every draft-model sampler shares, put before the sampler it extends in the bases
    (`class DraftSampler(DrafterMixin, SJDSampler)`): the drafter from `prepare(draft=)`, the
    checks that it fits the generator, and its run (`self._run`, a `DraftRun` with its own KV cache,
    prefilled with the condition) around the extended sampler's `_sample`, whose output gets the
    drafter's forward counts. Drafts accepted / tested accumulate over calls when the sampler
    counts them (`acceptance`)."""

    uses_draft = True
    multi_code = False  # a drafter proposes one code per position
    drafter = None
    _run: Optional[DraftRun] = None
    drafts_accepted, drafts_tested = 0, 0  # over every call of this sampler object (benchmarks)

    def prepare(self, **components):
        """Take the drafter from `draft=` (a generator); None keeps the one already given."""
        if components.get("draft") is not None:
            self.drafter = components["draft"]
        return self

    def check_model(self, model) -> None:
        super().check_model(model)
        drafter = self.drafter
        if drafter is None:
            raise ArgenError(MISSING_DRAFTER.format(name=self.name))
        problems = [(what, getattr(drafter, what), getattr(model, what))
                    for what in ("vocab_size", "condition_kind", "tokens_per_position")
                    if getattr(drafter, what) != getattr(model, what)]
        if problems:
            what, mine, theirs = problems[0]
            raise ArgenError(f"the drafter does not match the generator: its {what} is {mine!r}, the generator's "
                             f"{theirs!r} (train the drafter on the same codes and conditions)")
        if drafter.num_positions < model.num_positions:
            raise ArgenError(f"the drafter makes {drafter.num_positions} positions, the generator "
                             f"{model.num_positions}")

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        drafter = self.drafter
        if params.uses_cfg and not drafter.supports_cfg:
            raise ArgenError("cfg_scale > 1 needs a drafter trained with condition dropout (it has no null condition)")
        drafter.check_condition(cond, cond_mask)
        cond_all, mask_all = cfg_batch(drafter, cond, cond_mask, params)
        cond_len = drafter.condition_length(cond)
        cache = drafter.new_cache(cond_all.shape[0], cond_len + self.drafter_slots(num_tokens))
        drafter.prefill(cond_all, cache, mask_all)  # its first-token logits are not needed: the target samples x_0
        self._run = DraftRun(drafter, cache, cond_len, num_tokens, params, forwards=1,
                             row_forwards=torch.ones(cond.shape[0], dtype=torch.long))
        try:
            out = super()._sample(model, cond, cond_mask, num_tokens, params, streams, progress)
            run = self._run
        finally:
            self._run = None
        out.draft_forward_passes = run.forwards
        out.draft_forwards_per_sample = run.row_forwards
        self.drafts_accepted += run.accepted
        self.drafts_tested += run.tested
        return out

    def drafter_slots(self, num_tokens: int) -> int:
        """Slots after the condition that the drafter's cache needs (a sampler drafting a token tree needs scratch)."""
        return num_tokens

    @property
    def acceptance(self) -> Optional[float]:
        """Per-token acceptance rate so far: accepted / tested drafts (None before any test)."""
        return self.drafts_accepted / self.drafts_tested if self.drafts_tested else None


class DraftSampler(DrafterMixin, SJDSampler):
    """DraftSampler(window=6, stop=0.0): the target verifies up to window - 1 drafts of the drafter
    per forward; with stop > 0 a row's drafting ends after a draft the drafter itself gave a
    probability below `stop` (0: always draft the whole window)."""

    name = "draft"

    def __init__(self, window: int = 6, stop: float = 0.0):
        super().__init__(window=window, init="random")
        self.stop = check_number("stop", stop, 0.0, 1.0)

    def __repr__(self) -> str:
        return f"DraftSampler(window={self.window}, stop={self.stop})"

    def step(self, model, win: Window, lengths, width: int, cache, cond_len: int, num_tokens: int,
             params: SamplingParams, streams, ctx) -> torch.Tensor:
        # each row's window: the drafts its drafter made plus one row (without a stop: all of L - 1,
        # capped at the image end, i.e. `lengths` unchanged); finished rows stay at 0
        lengths = torch.minimum(lengths, self._run.drafted + 1)
        if self.stop > 0:  # the forward is only as wide as the widest row (one host read)
            width = int(lengths.max())
        m = super().step(model, win, lengths, width, cache, cond_len, num_tokens, params, streams, ctx)
        # per-token acceptance: the leading accepted drafts, plus one rejected draft per row that had one left
        accepted = (m - 1).clamp(min=0)
        self._run.accepted += int(accepted.sum())
        self._run.tested += int((accepted + (accepted < lengths - 1).long()).sum())
        return m

    # ---- drafts -----------------------------------------------------------------------------

    def init_drafts(self, win: Window, need: torch.Tensor, u: torch.Tensor, grid, q: torch.Tensor) -> None:
        """Every draft slot gets the drafter's token (the target's Jacobi rows are not used), drawn
        with u[:, j] from q[:, j], the drafter's processed distribution of image index e + j. Only
        as many slots as the next forward's widest row can verify are drafted; with `stop`, a row's
        drafting ends after its first draft d_j with q_j(d_j) < stop (run.drafted: drafts per row).

        Why the early stop keeps the sampler lossless: how many drafts a row gets depends only on
        the drafter's side, its own tokens and probabilities drawn with u_init, never on the
        target's probabilities or the acceptance uniforms. Speculative sampling is exact position
        by position for any such draft length: a position with a draft emits it with probability
        min(1, p/q) and the residual norm(relu(p - q)) otherwise, which is p; a position right
        after the last draft of a fully accepted window emits the bonus token drawn from p."""
        run = self._run
        emitted, n = win.emitted, run.num_tokens
        drafts = min(q.shape[1], n - int(emitted.min()) - 1)
        budget = (n - emitted - 1).clamp(0, max(drafts, 0))  # the drafts each row's next window can verify
        run.drafted = torch.zeros_like(emitted)
        if drafts <= 0:
            return
        spare = run.cond_len + n - 1
        run.cache.rewind(run.cond_len + torch.cat([emitted, emitted] if run.params.uses_cfg else [emitted]).sub(2)
                         .clamp(min=0))
        index = emitted[:, None] + torch.arange(-2, 0, device=emitted.device)  # x_{e-2}, x_{e-1}
        tokens = win.seq.gather(1, index.clamp(min=0))
        pos = torch.where(index < 0, spare, run.cond_len + index)  # no x_{-1}: a padding slot
        rows = torch.arange(win.seq.shape[0], device=emitted.device)
        drafting = budget > 0  # rows still drafting; a stopped row still rides along in the batched
        for j in range(drafts):  # forwards (its extra drafts are never verified nor counted)
            probs = self._draft_probs(run, tokens, pos, emitted + j)
            q[:, j] = probs
            token = sample_rows(probs, u[:, j])
            win.seq[rows, emitted + j] = token
            run.drafted += drafting
            drafting = drafting & (j + 1 < budget)
            if self.stop > 0:
                drafting = drafting & (probs.gather(1, token[:, None])[:, 0] >= self.stop)
                if not bool(drafting.any()):  # one host read per drafter forward, only with a stop
                    break
            tokens = token[:, None]
            pos = (run.cond_len + emitted + j).clamp(max=spare)[:, None]
        run.row_forwards += run.drafted.cpu()  # what each row's drafting cost it alone

    @staticmethod
    def _draft_probs(run: DraftRun, tokens, pos, index) -> torch.Tensor:
        """One drafter forward; its processed distribution of image index `index` [B] -> [B, V]."""
        tokens, pos = cfg_rows(tokens, pos, run.params.uses_cfg)
        logits = run.model.decode(tokens, pos, run.cache)[:, -1:]
        run.forwards += 1
        guided = guidance(run.params, index, 1, run.num_tokens)
        return logits_to_probs(logits, run.params, guided)[:, 0]
