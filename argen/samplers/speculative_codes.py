"""The speculative window loop for generators with k > 1 codes per position (token-shuffle: k = s²).

The same loop as `argen.samplers.speculative` (read its docstring first), with a code axis:
tokens [B, T, k], target and draft distributions [B, T, k, V]. What changes:

* each code of a draft position is tested against its own target row (`accept_ratio` of the
  sampler, applied code-wise); a position is accepted only when all its k codes are;
* the first position with a rejection is still committed whole: its accepted codes are kept and
  each rejected code is resampled from its own residual norm(relu(p - q)) (SJD / GSD), or the
  coupled draft of every code is taken (MC-SJD, whose coupling is exactly that rule, per code).

Why this is lossless: the generator predicts the k codes of a position from one hidden state, so
given the prefix they are independent (p = prod_j p_j), drafts are drawn code by code (q = prod_j
q_j) and every code has its own uniforms. Per code, "keep d_j with probability min(1, p_j/q_j),
else draw the residual" is a sample of p_j, so the committed position is a sample of p whatever
the accept pattern; whether the loop goes on to the next position depends only on that
position's own randomness, exactly as in the k = 1 proof. `tests/test_speculative_codes.py`
checks it with chi-square tests.

Kept apart from `speculative.py` so the k = 1 path (and its random streams, hence every shipped
sample) is untouched; `SpeculativeSampler._sample` hands k > 1 generators to `sample_codes`.
Draft init is "random" only here: copying a neighbouring window is not implemented for k > 1.
"""

from __future__ import annotations

import torch

from ..errors import ArgenError
from .base import ForwardTally, SamplerOutput, cfg_batch, cfg_halves
from .logits import logits_to_probs
from .rng import sample_rows
from .speculative import (Window, cfg_rows, draw_uniforms, guidance, leading_accepts, over_codes, per_position,
                          residual, rows_at, window_inputs, window_lengths)


def random_drafts(win: Window, need: torch.Tensor, u: torch.Tensor, q: torch.Tensor) -> None:
    """Uniform random drafts in the slots marked by need [B, S]: codes into win.seq [B, N + L, k],
    their draft distribution (uniform) into q [B, S, k, V]; u: [B, S, k]."""
    vocab = q.shape[-1]
    index = over_codes(win.emitted[:, None] + torch.arange(need.shape[1], device=need.device), win.seq)
    tokens = (u * vocab).long().clamp_(max=vocab - 1)
    win.seq.scatter_(1, index, torch.where(need[..., None], tokens, win.seq.gather(1, index)))
    q[need] = 1.0 / vocab


def propose_residual(probs, q, drafts, accept, has_draft, n_acc, u_res, u_fresh) -> torch.Tensor:
    """SJD / GSD with k codes: Y [B, T, k]. probs [B, T, k, V]; q [B, T-1, k, V]; drafts and
    accept [B, T-1, k]; has_draft [B, T-1]; n_acc [B]; u_res [B, >=1, k]; u_fresh [B, T, k].

    Y[:, :n_acc] are the accepted drafts; Y[:, n_acc] is the rejected position (accepted codes
    kept, rejected ones from their residuals) or the bonus position when all were accepted; the
    rows after are fresh samples of their rows (the next drafts, with q = those rows)."""
    fresh = sample_rows(probs, u_fresh)
    width = probs.shape[1]
    if width == 1:
        return fresh
    rejected = n_acc < has_draft.sum(-1)
    row = n_acc.clamp(max=width - 2)  # the rejected position (used only where rejected)
    fix = sample_rows(residual(rows_at(probs, row), rows_at(q, row)), u_res[:, 0])  # [B, k]
    fix = torch.where(rows_at(accept, row), rows_at(drafts, row), fix)
    extra = torch.where(rejected[:, None], fix, rows_at(fresh, n_acc))
    kept = torch.cat([drafts, fresh[:, -1:]], dim=1)
    out = torch.where((torch.arange(width, device=probs.device) < n_acc[:, None])[..., None], kept, fresh)
    return out.scatter(1, over_codes(n_acc[:, None], out), extra[:, None])


def propose_coupled(probs, q, drafts, accept, has_draft, n_acc, u_res, u_fresh) -> torch.Tensor:
    """MC-SJD with k codes: every code of every draft row keeps its draft when accepted, else
    moves to its residual (the maximal coupling); rows without a draft are fresh samples."""
    out = sample_rows(probs, u_fresh)
    width = probs.shape[1]
    if width == 1:
        return out
    moved = sample_rows(residual(probs[:, :-1], q), u_res[:, : width - 1])
    coupled = torch.where(accept, drafts, moved)
    out[:, :-1] = torch.where(has_draft[..., None], coupled, out[:, :-1])
    return out


def commit_codes(win: Window, proposals: torch.Tensor, m: torch.Tensor, probs: torch.Tensor):
    """`speculative.commit` with a code axis: proposals [B, T, k], probs [B, T, k, V]."""
    width, k, vocab = proposals.shape[1], proposals.shape[2], probs.shape[-1]
    win.seq.scatter_(1, over_codes(win.emitted[:, None] + torch.arange(width, device=m.device), win.seq), proposals)
    win.emitted = win.emitted + m
    src = m[:, None] + torch.arange(win.q.shape[1], device=m.device)
    index = src.clamp(max=width - 1)[..., None, None].expand(-1, -1, k, vocab)
    return src < width, probs.gather(1, index)


def step_codes(sampler, model, win: Window, lengths, width: int, cache, cond_len: int, num_tokens: int,
               params, streams, ctx, coupled: bool) -> torch.Tensor:
    """One forward of the k-code loop; returns m [B] (positions emitted per row)."""
    L, k = win.q.shape[1] + 1, win.q.shape[2]
    tokens, pos = window_inputs(win.seq, win.emitted, width, cond_len, num_tokens)  # [B, width, k], [B, width]
    guided = per_position(guidance(params, win.emitted, width, num_tokens), win.seq)
    x, p = cfg_rows(tokens, pos, params.uses_cfg)
    probs = logits_to_probs(model.decode(x, p, cache), params, guided)  # [B, width, k, V]
    u = draw_uniforms(streams, tokens.shape[0], (4 * L - 3) * k, probs.device).view(-1, 4 * L - 3, k)
    u_acc, u_res, u_fresh, u_init = u.split([L - 1, L - 1, L, L - 1], dim=1)
    drafts, q = tokens[:, 1:], win.q[:, : width - 1]
    has_draft = torch.arange(width - 1, device=probs.device) < (lengths - 1)[:, None]
    accept = u_acc[:, : width - 1] < sampler.accept_ratio(probs[:, :-1], q, drafts, ctx)  # [B, width-1, k]
    n_acc = leading_accepts(accept.all(-1) & has_draft)
    propose = propose_coupled if coupled else propose_residual
    proposals = propose(probs, q, drafts, accept, has_draft, n_acc, u_res, u_fresh[:, :width])
    m = torch.where(lengths > 0, n_acc + 1, 0)
    from_rows, win.q = commit_codes(win, proposals, m, probs)
    random_drafts(win, ~from_rows, u_init, win.q)
    kept = cond_len + win.emitted - 1
    cache.rewind(cfg_halves(kept, params.uses_cfg))
    return m


def sample_codes(sampler, model, cond, cond_mask, num_tokens: int, params, streams, progress: bool,
                 coupled: bool) -> SamplerOutput:
    """The speculative loop of `sampler` (its window and `accept_ratio`) for k > 1 codes per
    position. coupled: MC-SJD's maximal-coupling Jacobi update, else SJD's residual + fresh."""
    if sampler.init != "random":
        raise ArgenError(f"draft init {sampler.init!r} is not implemented for generators with "
                         f"{model.tokens_per_position} codes per position; use init=random")
    k = model.tokens_per_position
    ctx = sampler.context(model)
    cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
    batch, cond_len = cond.shape[0], model.condition_length(cond)
    cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
    probs = logits_to_probs(model.prefill(cond_all, cache, mask_all), params,
                            params.guidance_at(0, num_tokens))  # [B, k, V]
    window = min(sampler.window, num_tokens)
    vocab = probs.shape[-1]
    u = draw_uniforms(streams, batch, window * k, probs.device).view(batch, window, k)
    seq = torch.zeros(batch, num_tokens + window, k, dtype=torch.long, device=probs.device)
    seq[:, 0] = sample_rows(probs, u[:, 0])
    win = Window(seq=seq, emitted=torch.ones(batch, dtype=torch.long, device=probs.device),
                 q=torch.empty(batch, window - 1, k, vocab, device=probs.device))
    random_drafts(win, torch.ones(batch, window - 1, dtype=torch.bool, device=probs.device), u[:, 1:], win.q)
    tally = ForwardTally(batch, num_tokens, probs.device, progress)
    while True:
        lengths = window_lengths(win.emitted, window, num_tokens)
        width = int(lengths.max())
        if width == 0:
            break
        m = step_codes(sampler, model, win, lengths, width, cache, cond_len, num_tokens, params, streams, ctx,
                       coupled)
        tally.record(m, lengths > 0, win.emitted.min)
    return tally.output(win.seq[:, :num_tokens].flatten(1).clone())
