"""What the speculative samplers (SJD, GSD, MC-SJD) share: the window loop and its pieces.

One step is one forward pass (one NFE). For sample b with e_b image tokens committed so far
(the newest, x_{e-1}, is committed but not yet in the KV cache) and window length L_b:

* input    ``[x_{e-1}, d_e, ..., d_{e+L_b-2}]`` at image indices e-1 .. e+L_b-2, i.e. sequence
  positions ``cond_len + e - 1 + j`` (`window_inputs`);
* targets  ``P[:, j]`` = processed distribution (CFG, temperature, top-k/top-p through the shared
  `logits_to_probs`) of image token e+j; row j verifies draft d_{e+j}, whose draft distribution
  ``q[:, j]`` is stored with it (`target_probs`);
* verify   every draft at once: ``u < ratio`` (the sampler's `accept_ratio`), then n_acc = the
  number of leading accepts (`leading_accepts`) and m = n_acc + 1 tokens are emitted: the accepted
  drafts plus one token from row n_acc (residual on a rejection, bonus when all were accepted);
* update   the sampler's `propose` returns Y [B, T]: Y[:, :m] are the emitted tokens and
  Y[:, m:] the next drafts (Jacobi update) with q = P[:, m:] (`commit`); slots past the rows of
  this window get fresh drafts (`init_drafts`);
* cache    keeps x_{e-1} and the accepted drafts: every row is rewound to ``cond_len + e_new - 1``
  (the cache hides slots past a query's position, so nothing moves).

Ragged batches: each row keeps its own e_b and window. The forward runs T = max_b L_b slots;
rows with a shorter window (the end of the image) or finished rows pad with slots at the spare
position ``cond_len + N - 1`` that no real query can see. Each row draws a fixed number of
uniforms per step from its own stream, so a sample does not depend on its batch. CFG halves
get identical tokens, positions and rewinds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import check_number
from ..errors import ArgenError
from .base import ForwardTally, Sampler, SamplerOutput, cfg_batch, cfg_halves
from .logits import SamplingParams, logits_to_probs
from .rng import RandomStreams, sample_rows

INITS = ("random", "left", "above")
INIT_ALIASES = {"repeat_horizon": "left", "repeat_vertical": "above"}


# ---- random numbers ------------------------------------------------------------------------


def draw_uniforms(streams: Optional[RandomStreams], batch: int, n: int, device) -> torch.Tensor:
    """[batch, n] float64 uniforms: row i from stream i, or from the global RNG."""
    if streams is None:
        return torch.rand(batch, n, dtype=torch.float64).to(device)
    return streams.uniform(n, device=device)


def residual(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """relu(p - q) (unnormalised; `sample_rows` normalises). Where it is numerically empty
    (p == q, so a rejection has probability ~0) fall back to p."""
    r = (p - q).clamp_min(0)
    return torch.where(r.sum(-1, keepdim=True) > eps, r, p)


# ---- window bookkeeping ----------------------------------------------------------------------


@dataclass
class Window:
    """Per-sample state. seq [B, N + L]: committed tokens at [0, e), drafts at [e, e + L - 1),
    scratch after (padding slots read and write there). q [B, L - 1, V]: the draft
    distribution of each draft slot."""

    seq: torch.Tensor
    emitted: torch.Tensor
    q: torch.Tensor


def window_lengths(emitted: torch.Tensor, window: int, num_tokens: int) -> torch.Tensor:
    """L_b = min(L, N - e_b): the window shrinks so no row predicts past the image (0 = done)."""
    return (num_tokens - emitted).clamp(min=0, max=window)


def covering_width(left: int, window: int) -> int:
    """The forward's width when some row has `left` tokens still to emit: the window, or near the
    image's end the power of two that covers what is left. Rows past their end pad (as in ragged
    batches), so no sample depends on it; a compiled step builds one graph per width, and exact
    end widths (15, 13, 10, ...) each recompiled it for seconds on first use."""
    return min(window, 1 << max(left - 1, 0).bit_length())


def window_inputs(seq, emitted, width: int, cond_len: int, num_tokens: int):
    """Tokens [B, width] (seq [B, S]) or [B, width, k] (seq [B, S, k]: k codes per position) and
    positions [B, width] of the window; padding slots sit at the spare position cond_len + N - 1
    (never attended to by a real query of this image)."""
    index = emitted[:, None] - 1 + torch.arange(width, device=seq.device)
    pos = (cond_len + index).clamp(max=cond_len + num_tokens - 1)
    return seq.gather(1, over_codes(index, seq)), pos


def cfg_rows(tokens: torch.Tensor, pos: torch.Tensor, uses_cfg: bool):
    """A forward's tokens and positions for both CFG halves (conditional rows first, as `cfg_batch`):
    the tokens twice, per-row positions [B, T] twice, shared positions [T] as they are.

    One row's positions [1, T] become shared ones [T]: the cache then writes each layer's keys in one
    kernel and builds the attention mask once for every row, the same logits for an 8-token forward
    about 4% cheaper at batch 1 (docs/history/speculative.md, "Session 37"); a drafter's steps too."""
    if pos.dim() == 2 and pos.shape[0] == 1:
        pos = pos[0]
    return cfg_halves(tokens, uses_cfg), pos if pos.dim() == 1 else cfg_halves(pos, uses_cfg)


def over_codes(index: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """A [B, T] position index for gathers and scatters on seq: itself for seq [B, S], expanded
    over the code axis for seq [B, S, k] (generators with k codes per position)."""
    return index if seq.dim() == 2 else index[..., None].expand(*index.shape, seq.shape[2])


def same_positions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, T] whether a and b ([B, T], or [B, T, k] with k codes per position) hold the same token at
    each position: all k codes equal."""
    same = a == b
    return same.all(-1) if same.dim() == 3 else same


def per_position(guided, seq: torch.Tensor):
    """`guidance`'s [B, T, 1] scales for logits [B, T, k, V] when seq [B, S, k] has a code axis:
    one scale for the k codes of a position (bools and k = 1 pass through)."""
    return guided[..., None] if isinstance(guided, torch.Tensor) and seq.dim() == 3 else guided


def guidance(params: SamplingParams, emitted: torch.Tensor, width: int, num_tokens: int = 0):
    """Whether each window row is guided: a bool, or [B, width, 1] when cfg_interval applies;
    under a guidance schedule, each row's scale [B, width, 1]."""
    if not params.uses_cfg or (params.cfg_schedule == "constant" and params.cfg_interval < 0):
        return params.uses_cfg
    return guidance_of(params, emitted[:, None] + torch.arange(width, device=emitted.device), num_tokens)


def guidance_of(params: SamplingParams, index: torch.Tensor, num_tokens: int):
    """`guidance` for queries predicting the image indices `index` [B, T] (in any order)."""
    if params.uses_cfg and params.cfg_schedule != "constant":
        return params.guidance_rows(index, num_tokens)[..., None]
    if not params.uses_cfg or params.cfg_interval < 0:
        return params.uses_cfg
    return (index <= params.cfg_interval + 1)[..., None]


def target_probs(model, tokens, pos, cache, params: SamplingParams, guided) -> torch.Tensor:
    """One forward over the window (both CFG halves get the same tokens and positions)."""
    tokens, pos = cfg_rows(tokens, pos, params.uses_cfg)
    return logits_to_probs(model.decode(tokens, pos, cache), params, guided)


# ---- verification --------------------------------------------------------------------------


def gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [..., V], index [...] -> x[..., index]."""
    return x.gather(-1, index[..., None]).squeeze(-1)


def token_ratio(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """p(d) / q(d): the speculative-sampling acceptance ratio (q(d) > 0: d was drawn from q)."""
    return gather_last(p, drafts) / gather_last(q, drafts)


def leading_accepts(accept: torch.Tensor) -> torch.Tensor:
    """Number of leading True per row of accept [B, S]."""
    return accept.long().cumprod(-1).sum(-1)


def rows_at(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> x[b, rows[b]] for each b."""
    index = rows.view(-1, 1, *([1] * (x.dim() - 2))).expand(-1, 1, *x.shape[2:])
    return x.gather(1, index).squeeze(1)


# ---- drafts --------------------------------------------------------------------------------


def set_draft_q(q: torch.Tensor, need: torch.Tensor, tokens: torch.Tensor, copied=None) -> None:
    """Write the draft distributions of the slots marked in need [B, S] into q [B, S, V], in place:
    uniform for a random draft (what it was drawn from; it accepts at least as often as the
    one-hot q of the reference code), one-hot on the token for a copied (deterministic) draft.
    Only the needed rows are touched: q is [B, L-1, V] and is rewritten every step."""
    # masked_fill_ / scatter_ rather than q[need] = ...: a boolean-index write finds the True
    # entries on the host (nonzero) every step; these write the same values with no host work
    q.masked_fill_(need[..., None], 1.0 / q.shape[-1])
    if copied is not None:
        fixed = (need & copied)[..., None]
        q.masked_fill_(fixed, 0.0)
        index = tokens[..., None]
        q.scatter_(-1, index, torch.where(fixed, torch.ones((), dtype=q.dtype), q.gather(-1, index)))


def spatial_drafts(seq, index, need, u, vocab: int, grid, mode: str):
    """Copy the token to the left / above each slot (random where there is none), in slot order
    so a slot can copy an earlier one. Writes the chosen drafts into seq; returns them and
    whether each was copied."""
    cols = grid[1] if grid is not None else seq.shape[1]  # 1D: "left" is the previous token
    tokens, copied = [], []
    for k in range(index.shape[1]):
        idx = index[:, k]
        src = idx - 1 if mode == "left" else idx - cols
        has_src = (idx % cols != 0) if mode == "left" else (src >= 0)
        pick = torch.where(has_src, gather_last(seq, src.clamp(min=0)), (u[:, k] * vocab).long().clamp(max=vocab - 1))
        pick = torch.where(need[:, k], pick, gather_last(seq, idx))
        seq.scatter_(1, idx[:, None], pick[:, None])
        tokens.append(pick)
        copied.append(has_src)
    return torch.stack(tokens, 1), torch.stack(copied, 1)


def init_drafts(win: Window, need: torch.Tensor, u: torch.Tensor, init: str, grid, q: torch.Tensor) -> None:
    """Fill the draft slots marked in need [B, L-1]: their tokens in win.seq, their rows of q."""
    vocab = q.shape[-1]
    index = win.emitted[:, None] + torch.arange(need.shape[1], device=need.device)
    if init == "random":
        tokens = (u * vocab).long().clamp_(max=vocab - 1)
        win.seq.scatter_(1, index, torch.where(need, tokens, win.seq.gather(1, index)))
        set_draft_q(q, need, tokens)
    else:
        tokens, copied = spatial_drafts(win.seq, index, need, u, vocab, grid, init)
        set_draft_q(q, need, tokens, copied)


def commit(win: Window, proposals: torch.Tensor, m: torch.Tensor, probs: torch.Tensor):
    """Write Y (emitted tokens, then Jacobi drafts) at image indices e.. and advance e by m.

    Slot k of the next window is old row m + k when the window had that row (its draft is
    already in seq, its q is that row of P). Returns (from_rows [B, L-1], their q); the other
    slots need fresh drafts."""
    width = proposals.shape[1]
    win.seq.scatter_(1, win.emitted[:, None] + torch.arange(width, device=m.device), proposals)
    win.emitted = win.emitted + m
    src = m[:, None] + torch.arange(win.q.shape[1], device=m.device)
    jacobi_q = probs.gather(1, src.clamp(max=width - 1)[..., None].expand(-1, -1, probs.shape[-1]))
    return src < width, jacobi_q


# ---- the sampler ---------------------------------------------------------------------------


class SpeculativeSampler(Sampler):
    """The speculative Jacobi loop. Subclasses define `accept_ratio` (how a draft is tested)
    and `propose` (which tokens are emitted and which become the next drafts).

    window: tokens fed per forward (L); 1 is plain AR. init: how new draft slots are filled,
    "random" (uniform over the vocabulary), "left" or "above" (repeat the neighbouring token in
    the image grid: the spatial priors of SJD).
    """

    option_aliases = {"L": "window"}
    # k > 1 codes per position go to `speculative_codes.sample_codes`, which knows two Jacobi
    # updates: SJD's (residual + fresh rows) and, when True, MC-SJD's maximal coupling.
    coupled_drafts = False

    def __init__(self, window: int = 16, init: str = "random"):
        window = check_number("window (L)", window, 1, None, integer=True)  # capped at the image length when sampling
        init = INIT_ALIASES.get(init, init) if isinstance(init, str) else init
        if init not in INITS:
            raise ArgenError(f"unknown draft init {init!r}; choose one of {', '.join(INITS)}")
        self.window, self.init = window, init

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window}, init={self.init!r})"

    @property
    def needs_grid(self) -> bool:
        return self.init == "above"

    # ---- hooks ----------------------------------------------------------------------------

    def context(self, model) -> dict:
        """Per-call context for `accept_ratio` (GSD: embeddings)."""
        return {}

    @abc.abstractmethod
    def accept_ratio(self, p, q, drafts, ctx) -> torch.Tensor:
        """Acceptance probability (before min(1, .)) of each draft: [B, S]."""

    @abc.abstractmethod
    def propose(self, probs, q, drafts, accept, has_draft, n_acc, u_res, u_fresh) -> torch.Tensor:
        """Y [B, T]: Y[:, :n_acc+1] emitted, Y[:, n_acc+1:] the next drafts."""

    def init_drafts(self, win: Window, need: torch.Tensor, u: torch.Tensor, grid, q: torch.Tensor) -> None:
        """Fill the draft slots marked in need [B, L-1]: tokens in win.seq, draft distributions
        in the same rows of q [B, L-1, V] (in place; the other rows are left alone)."""
        init_drafts(win, need, u, self.init, grid, q)

    # ---- loop -----------------------------------------------------------------------------

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        if model.tokens_per_position > 1:
            from .speculative_codes import sample_codes

            return sample_codes(self, model, cond, cond_mask, num_tokens, params, streams, progress,
                                coupled=self.coupled_drafts)
        ctx = self.context(model)
        cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
        batch, cond_len = cond.shape[0], model.condition_length(cond)
        cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
        probs = logits_to_probs(model.prefill(cond_all, cache, mask_all), params, params.guidance_at(0, num_tokens))
        window = min(self.window, num_tokens)  # a longer window only costs memory: rows past the image never run
        win = self.start(probs, streams, num_tokens, model.grid, window)
        tally = ForwardTally(batch, num_tokens, probs.device, progress)
        while True:
            # the one host read per step: the most any row has left is N - min_b e_b (0: all done)
            left = num_tokens - int(win.emitted.min())
            if left <= 0:
                break
            width = covering_width(left, window)
            lengths = window_lengths(win.emitted, window, num_tokens)
            m = self.step(model, win, lengths, width, cache, cond_len, num_tokens, params, streams, ctx)
            tally.record(m, lengths > 0, win.emitted.min)
        return tally.output(win.seq[:, :num_tokens].clone())

    def start(self, probs, streams, num_tokens: int, grid, window: Optional[int] = None) -> Window:
        """Sample token 0 from the prefill distribution and draw the first drafts (`window`:
        the window length used, default self.window)."""
        window = self.window if window is None else window
        batch, vocab = probs.shape
        u = draw_uniforms(streams, batch, window, probs.device)
        seq = torch.zeros(batch, num_tokens + window, dtype=torch.long, device=probs.device)
        seq[:, 0] = sample_rows(probs, u[:, 0])
        q = torch.empty(batch, window - 1, vocab, device=probs.device)
        win = Window(seq=seq, emitted=torch.ones(batch, dtype=torch.long, device=probs.device), q=q)
        need = torch.ones(batch, window - 1, dtype=torch.bool, device=probs.device)
        self.init_drafts(win, need, u[:, 1:], grid, q)
        return win

    def step(self, model, win: Window, lengths, width: int, cache, cond_len: int, num_tokens: int,
             params: SamplingParams, streams, ctx) -> torch.Tensor:
        """One forward: verify the window, emit, Jacobi-update, rewind. Returns m [B]."""
        L = win.q.shape[1] + 1  # the window length of this call (self.window capped at the image length)
        tokens, pos = window_inputs(win.seq, win.emitted, width, cond_len, num_tokens)
        probs = target_probs(model, tokens, pos, cache, params, guidance(params, win.emitted, width, num_tokens))
        # a fixed budget per row and step: acceptance, residual, Jacobi samples, new drafts
        u = draw_uniforms(streams, tokens.shape[0], 4 * L - 3, probs.device)
        u_acc, u_res, u_fresh, u_init = u.split([L - 1, L - 1, L, L - 1], dim=1)
        drafts, q = tokens[:, 1:], win.q[:, : width - 1]
        has_draft = torch.arange(width - 1, device=probs.device) < (lengths - 1)[:, None]
        accept = u_acc[:, : width - 1] < self.accept_ratio(probs[:, :-1], q, drafts, ctx)
        n_acc = leading_accepts(accept & has_draft)
        proposals = self.propose(probs, q, drafts, accept, has_draft, n_acc, u_res, u_fresh[:, :width])
        m = torch.where(lengths > 0, n_acc + 1, 0)
        from_rows, win.q = commit(win, proposals, m, probs)
        self.init_drafts(win, ~from_rows, u_init, model.grid, win.q)
        kept = cond_len + win.emitted - 1
        cache.rewind(cfg_halves(kept, params.uses_cfg))
        return m
