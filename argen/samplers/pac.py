"""`pac`: proactive drafting with a token tree, after SJD-PAC (CVPR 2026). Lossless.

The observation behind SJD-PAC: a Jacobi window usually fails at its first draft, right after
a rejection, because that draft was predicted from a context that held the rejected token. So
after a rejection, draft several candidates for that position, not one, and verify them all in
the same forward with a tree attention mask (each token sees the cache, its ancestors and
itself); whichever candidate is right carries its own chain of later drafts.

Here the tree is: the root (the newest committed token), the main chain of L-1 Jacobi drafts,
and branches: with F = 1 (`levels`), K-1 alternative first drafts hanging off the root, each
followed by the main chain's next D-1 drafts; with F > 1, every combination of K candidates for
each of the first F draft positions (SJD-PAC's K-ary tree), each path then continued to depth D.
The candidates for a position are the best K tokens of the latest scores computed for it (its
stale scores, kept per image index); the best is the Jacobi draft.

Verification uses `auto`'s sampling rule (argen.samplers.auto): every position k has Gumbel noise
g_k drawn once from the sample's stream, and its token is argmax(l_k + g_k) under its true
context. A tree token is right iff it equals that argmax at its parent; at most one candidate per
position can be. So the emitted tokens are exactly `auto`'s (the same seed gives the same image
with `pac`, `auto` and any window or tree), which makes this sampler lossless (Gumbel-max) and
its samples independent of batch, tree shape and timing. SJD-PAC verifies a tree with
recursive rejection sampling instead; the Gumbel coupling turns that into a comparison.

Adaptive continuation (SJD-PAC's second part). In the authors' released scheduler it does not
emit anything past the first rejection: the drafts after it are tested against their cached
(stale) distributions, a draft that passes is kept as the next iteration's draft at its
position, one that fails is redrawn from the residual, and the stale distribution becomes its
draft distribution. That is a coupling of successive drafts (the new draft is an exact sample of
the stale distribution that repeats the old one when it can: MC-SJD's maximal coupling), which
is why it is lossless with no assumption on how fast image tokens forget their context. Here the
fixed per-position Gumbel noise does the same: the next draft at k is argmax(stale l_k + g_k),
which repeats the old draft whenever the stale scores still rank it first, and it is re-verified
in the next forward against its true context. So every draft past a rejection is kept and
re-verified; nothing else is needed for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from ..checks import check_number
from ..errors import ArgenError
from .auto import position_noise
from .base import ForwardTally, Sampler, SamplerOutput, cfg_batch, cfg_halves
from .logits import process_logits
from .speculative import guidance, over_codes, per_position, same_positions


MAX_TREE = 2048  # tokens per forward: a guard against K**F trees that could not run anyway


@dataclass(frozen=True)
class Tree:
    """A draft tree. Token i has parent parents[i] (-1: the root, token 0), sits depths[i]
    positions after the root and is candidate ranks[i] of its depth (0: the Jacobi draft, r: the
    r-th runner-up of the stale scores). paths[i][j] is the token at depth j on the path through
    token i: its ancestors, then its rank-0 descendants, then the main chain (the path's later
    drafts once token i is the deepest accepted one)."""

    parents: tuple
    depths: tuple
    ranks: tuple
    paths: tuple


def build_tree(window: int, branches: int, depth: int, levels: int) -> Tree:
    """Main chain of `window` tokens (root included), then every rank tuple (r_1, .., r_t) with
    t <= depth, r_s < branches for s <= levels and r_s = 0 after, in depth-first order (so a
    parent precedes its children, and the main chain wins ties)."""
    nodes = [(0,) * t for t in range(window)]

    def grow(prefix):
        if len(prefix) == depth:
            return
        for r in range(branches if len(prefix) < levels else 1):
            node = prefix + (r,)
            if any(node):
                nodes.append(node)
            grow(node)

    grow(())
    index = {node: i for i, node in enumerate(nodes)}
    paths = []
    for node in nodes:
        path = []
        for j in range(window):
            longer = node[:j] if j <= len(node) else node + (0,) * (j - len(node))
            path.append(index.get(longer, j))  # past the subtree: the main chain's token at depth j
        paths.append(tuple(path))
    return Tree(parents=tuple(index[n[:-1]] if n else -1 for n in nodes), depths=tuple(len(n) for n in nodes),
                ranks=tuple(n[-1] if n else 0 for n in nodes), paths=tuple(paths))


@lru_cache(maxsize=32)
def alternative_sources(tree: Tree, device: torch.device) -> tuple:
    """(levels F, branches K, source [T] on `device`): where each tree token comes from, in
    `cat([main chain of L tokens, the F*(K-1) alternatives by depth and rank])`. Built once per
    tree and device, not per step (the index tensor is only read)."""
    window = len(tree.paths[0])
    levels = max((d for d, r in zip(tree.depths, tree.ranks) if r), default=1)
    branches = max(tree.ranks) + 1
    source = [d if r == 0 else window + (d - 1) * (branches - 1) + r - 1 for d, r in zip(tree.depths, tree.ranks)]
    return levels, branches, torch.tensor(source, device=device)


def best_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` (at most) best tokens of each position by its scores, best first: [B, F, V] ->
    indices [B, F, count]; with k codes per position, [B, F, k, V] -> code tuples [B, F, count, k],
    ranked by their summed scores (the codes are independent given the context, so a tuple's score
    is the sum of its codes'). The best tuple is every code's argmax: the Jacobi draft. Exact top
    tuples by merging one code at a time and keeping the best `count` partial tuples: a prefix of
    a top tuple is a top partial tuple."""
    if scores.dim() == 3:
        return scores.topk(min(count, scores.shape[-1]), dim=-1).indices
    values, tuples = None, None
    for code in range(scores.shape[2]):
        v, i = scores[:, :, code].topk(min(count, scores.shape[-1]), dim=-1)  # [B, F, c]
        if values is None:
            values, tuples = v, i[..., None]
            continue
        sums = (values[..., :, None] + v[..., None, :]).flatten(-2)  # [B, F, kept * c]
        values, pick = sums.topk(min(count, sums.shape[-1]), dim=-1)
        prefix = tuples.gather(2, (pick // v.shape[-1])[..., None].expand(-1, -1, -1, tuples.shape[-1]))
        tuples = torch.cat([prefix, i.gather(2, pick % v.shape[-1])[..., None]], -1)
    return tuples


class PACSampler(Sampler):
    """PACSampler(window=16, branches=4, depth=3, levels=1): main chain of `window` tokens (root
    included); the first `levels` draft positions branch into `branches` candidates each (every
    combination), and each alternative path is followed by drafts down to `depth`. levels=1 is
    the main chain plus branches-1 alternative first drafts of depth-1 drafts each
    (window + (branches-1)*depth tokens per forward); levels=2, depth=2 is SJD-PAC's default
    tree (K-ary over two positions, then the chain)."""

    name = "pac"
    multi_code = True  # k codes per position: a tree token is a position's k codes (`best_tokens`)
    option_aliases = {"L": "window", "K": "branches", "D": "depth", "F": "levels"}

    def __init__(self, window: int = 16, branches: int = 4, depth: int = 3, levels: int = 1):
        self.window = check_number("window (L)", window, 2, None, integer=True)
        self.branches = check_number("branches (K)", branches, 1, None, integer=True)
        self.depth = check_number("depth (D)", depth, 1, None, integer=True)
        self.levels = check_number("levels (F)", levels, 1, None, integer=True)
        if self.depth > self.window - 1:
            raise ArgenError(f"depth (D) must be at most window - 1 = {self.window - 1}, got {self.depth}")
        if self.levels > self.depth:
            raise ArgenError(f"levels (F) must be at most depth (D) = {self.depth}, got {self.levels}")
        size = self.window + sum(self.branches ** min(t, self.levels) - 1 for t in range(1, self.depth + 1))
        if size > MAX_TREE:
            raise ArgenError(f"a tree of {size} tokens per forward is too large (at most {MAX_TREE}); "
                             "lower branches (K), levels (F) or depth (D)")

    def __repr__(self) -> str:
        levels = f", levels={self.levels}" if self.levels != 1 else ""
        return f"PACSampler(window={self.window}, branches={self.branches}, depth={self.depth}{levels})"

    def layout(self, window: int, depth: int):
        """parents [T] and depth of each token [T] of this sampler's tree."""
        tree = build_tree(window, self.branches, depth, min(self.levels, depth))
        return list(tree.parents), list(tree.depths)

    def tree_for(self, num_tokens: int) -> Tree:
        """The tree of a call making `num_tokens` tokens (window and depth capped by the image)."""
        L = min(self.window, num_tokens)
        D = min(self.depth, L - 1)
        return build_tree(L, self.branches, D, min(self.levels, D))

    def tree_tokens(self, tree: Tree, seq, stale, noise, emitted) -> torch.Tensor:
        """The next forward's tokens [B, T], token 0 the newest committed one. Here: the main chain
        is the Jacobi drafts in seq (x_{e-1}, d_e, .., d_{e+L-2}); a rank-r token at depth d is the
        r-th best of the stale scores of image index e + d - 1 (the best is the Jacobi draft).
        A subclass may draft them another way (`draft-pac`)."""
        window, device = len(tree.paths[0]), seq.device
        levels, branches, source = alternative_sources(tree, device)
        chain = seq.gather(1, over_codes(emitted[:, None] + torch.arange(-1, window - 1, device=device), seq))
        at = emitted[:, None] + torch.arange(levels, device=device)
        rows = torch.arange(seq.shape[0], device=device)[:, None]
        picks = best_tokens(stale[rows, at], branches)[:, :, 1:]  # [B, F, <= K-1(, k)]
        if picks.shape[2] < branches - 1:  # fewer tokens than K: repeat (a duplicate never wins)
            picks = torch.cat([picks, picks[:, :, :1].expand(-1, -1, branches - 1 - picks.shape[2], *picks.shape[3:])], 2)
        # each token's source: its depth's Jacobi draft (rank 0) or one of the F*(K-1) alternatives
        return torch.cat([chain, picks.flatten(1, 2)], 1)[:, source]

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        if num_tokens < 2:
            raise ArgenError(f"{self!r} needs at least 2 tokens")
        cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
        batch, cond_len = cond.shape[0], model.condition_length(cond)
        tree = self.tree_for(num_tokens)
        L, T = len(tree.paths[0]), len(tree.parents)
        scratch = cond_len + num_tokens
        cache = model.new_cache(cond_all.shape[0], scratch + T)
        if not hasattr(cache, "set_tree"):
            raise ArgenError(f"{self!r} needs a cache with set_tree(); this generator's cache has none")
        first = process_logits(model.prefill(cond_all, cache, mask_all), params, params.guidance_at(0, num_tokens))
        device = first.device
        noise = position_noise(streams, model, batch, num_tokens, device, scratch=L + 1)
        # stale[b, k]: the latest scores (logits + noise) computed for image index k, whatever
        # context they had; before any forward, the noise alone. Its argmax is the Jacobi draft
        # in seq, its runner-ups the alternatives (SJD-PAC drafts them from the stale distribution).
        stale = noise.clone()
        seq = noise.argmax(-1)  # blind drafts
        seq[:, 0] = (first + noise[:, 0]).argmax(-1)

        depth_t = torch.tensor(tree.depths, device=device)
        parent_t = torch.tensor(tree.parents, device=device).clamp(min=0)
        paths = torch.tensor(tree.paths, device=device)  # [T, L]
        ancestors = torch.zeros(T, T)
        for i, path in enumerate(tree.paths):  # token i's ancestors (and itself) are paths[i][:depth_i + 1]
            ancestors[i, list(path[: tree.depths[i] + 1])] = 1.0
        ancestors = ancestors.to(device)
        order = depth_t * T + (T - 1 - torch.arange(T, device=device))  # deepest first, then the earliest token
        rows = torch.arange(batch, device=device)[:, None]
        main = torch.arange(L, device=device)
        spare = cond_len + num_tokens - 1  # never a real tree position (the last token is never fed)
        cfg2 = partial(cfg_halves, uses_cfg=params.uses_cfg)

        emitted = torch.ones(batch, dtype=torch.long, device=device)
        tally = ForwardTally(batch, num_tokens, device, progress)
        while int(emitted.min()) < num_tokens:
            tokens = self.tree_tokens(tree, seq, stale, noise, emitted)
            lengths = (num_tokens - emitted).clamp(0, L)
            index = emitted[:, None] + main  # image index each main-chain token predicts
            valid = depth_t[None, :] <= (lengths - 1).clamp(min=0)[:, None]  # a draft for an index < N
            valid[:, 0] = lengths > 0
            pos = torch.where(valid, cond_len + emitted[:, None] - 1 + depth_t, spare)
            guided = guidance(params, emitted, L, num_tokens)
            if not isinstance(guided, bool):
                guided = per_position(guided.gather(1, depth_t[None, :, None].expand(batch, -1, 1)), seq)
            cache.set_tree(tree.parents, scratch)
            logits = process_logits(model.decode(cfg2(tokens), cfg2(pos), cache), params, guided)
            scores = logits + noise[rows, (emitted[:, None] + depth_t).clamp(max=noise.shape[1] - 1)]
            y = scores.argmax(-1)  # [B, T(, k)]: the true next token of each tree token's path
            # a token is right iff it is its parent's y (all k codes of it; at most one sibling can
            # be); a path is accepted while all its tokens are right; the deepest accepted token wins
            right = same_positions(tokens, y[:, parent_t]) & valid
            right[:, 0] = True
            accepted_path = (~right).float() @ ancestors.T == 0
            winner = torch.where(accepted_path, order, -1).argmax(1)
            n = depth_t[winner]
            m = torch.where(lengths > 0, n + 1, 0)
            path_idx = paths[winner]  # [B, L]
            # y along the path: the emitted tokens (depth <= n), then the next Jacobi drafts; the
            # path's scores become the stale scores of those indices
            seq.scatter_(1, over_codes(index, seq), y.gather(1, over_codes(path_idx, y)))
            stale[rows, index] = scores[rows, path_idx]
            keep = (main[None, :] <= n[:, None]) & (lengths > 0)[:, None]
            cache.keep_path(cfg2(path_idx), cfg2(torch.where(keep, cond_len + emitted[:, None] - 1 + main, spare)))
            emitted = emitted + m
            cache.rewind(cfg2(cond_len + emitted - 1))
            tally.record(m, lengths > 0, emitted.min)
        return tally.output(seq[:, :num_tokens].flatten(1).clone())  # position-major codes
