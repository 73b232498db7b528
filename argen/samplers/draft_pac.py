"""`draft-pac`: a draft model's drafts in `pac`'s token tree. Lossless: exactly `auto`'s tokens.

`pac` ranks each tree position's candidates by its stale scores, the target's logits from the
last forward (computed with a context that held rejected drafts) plus the position's Gumbel
noise. Here a drafter, a small generator over the same codes (`argen.samplers.draft`), supplies
those scores instead: before every target forward it runs along the main chain from the committed
prefix, and its score for image index k is its own processed logits plus the *same* noise g_k the
target uses. Its best token is the main-chain draft, its runner-ups at the first `levels` indices
the tree's alternatives, and each branch is continued by the drafter's picks after the branch's own
tokens (one drafter forward over the tree per level), where `pac` reuses the main chain's drafts.
Everything after the drafting is `pac`'s: one target forward over the tree, a token is right iff it
is argmax(l_k + g_k) at its parent, the deepest right path wins.

Why the same noise: with a shared Gumbel, drafter and target pick the same token whenever their
processed distributions are close (Gumbel-max coupling), and where they do not, the target's pick
is usually among the drafter's next best, which the alternatives cover. Why it is lossless: the
emitted tokens are the target's argmax(l_k + g_k) under their true context, so they are `auto`'s
tokens whatever the drafter proposes (the same seed gives the same image with `ar`-under-Gumbel,
`auto`, `pac` and this sampler); the drafter only changes how many target forwards a sample needs.

The drafter's KV cache is addressed by position, like the target's. It holds the right keys up to
the first fed draft that was not committed; each drafting pass first feeds the committed tokens
from there on (one forward, left-padded across rows, whose last query scores the next index),
then one draft per forward. NFE counts target forwards; the drafter's are counted apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from .base import cfg_halves
from .draft import DrafterMixin
from .logits import process_logits
from .pac import PACSampler, Tree
from .speculative import cfg_rows, guidance, leading_accepts


class DraftPACSampler(DrafterMixin, PACSampler):
    """DraftPACSampler(window=16, branches=4, depth=3, levels=1): `pac`'s tree (same options),
    drafted by the drafter."""

    name = "draft-pac"

    def __repr__(self) -> str:
        return "Draft" + super().__repr__()

    def drafter_slots(self, num_tokens: int) -> int:
        return num_tokens + len(self.tree_for(num_tokens).parents)  # the tree's scratch slots after the image

    def tree_tokens(self, tree: Tree, seq, stale, noise, emitted) -> torch.Tensor:
        window = len(tree.paths[0])
        self._draft_chain(seq, stale, noise, emitted, window)
        tokens = super().tree_tokens(tree, seq, stale, noise, emitted)  # the chain, its alternatives at levels
        self._draft_branches(tree, tokens, noise, emitted)
        return tokens

    def _draft_chain(self, seq, stale, noise, emitted, window: int) -> None:
        """The main chain, one drafter forward per draft: seq[b, e_b + j] = the drafter's best token,
        stale[b, e_b + j] its scores (processed logits + the position's noise)."""
        run = self._run
        n, cond_len, params = run.num_tokens, run.cond_len, run.params
        spare = cond_len + n - 1  # a slot no real query sees: padding goes there
        active = emitted < n
        rows = torch.arange(seq.shape[0], device=seq.device)
        # the drafter's keys are right up to `valid`: the committed tokens it was fed, and the fed
        # drafts up to the first one that was not committed
        valid = torch.zeros_like(emitted)
        if run.fed is not None:
            fed_at, fed = run.fed
            index = fed_at[:, None] + torch.arange(fed.shape[1], device=seq.device)
            valid = fed_at + leading_accepts((fed == seq.gather(1, index)) & (index < emitted[:, None]))
        width = int(torch.where(active, emitted - valid, 1).max())  # one host read per step
        index = emitted[:, None] + torch.arange(-width, 0, device=seq.device)  # the newest committed token last
        tokens = seq.gather(1, index.clamp(min=0))
        pos = torch.where((index >= valid[:, None]) & active[:, None], cond_len + index, spare)
        steps = min(window - 1, n - 1 - int(emitted.min()))  # drafts the widest window can verify
        for j in range(steps):
            at = emitted + j  # the image index this forward scores
            tokens, pos = cfg_rows(tokens, pos, params.uses_cfg)
            logits = run.model.decode(tokens, pos, run.cache)[:, -1:]
            scores = process_logits(logits, params, guidance(params, at, 1, n))[:, 0] + noise[rows, at]
            stale[rows, at] = scores
            seq[rows, at] = token = scores.argmax(-1)
            tokens, pos = token[:, None], (cond_len + at).clamp(max=spare)[:, None]
        fed = max(steps - 1, 0)  # the last draft is verified, never fed
        run.fed = (emitted.clone(), seq.gather(1, emitted[:, None] + torch.arange(fed, device=seq.device)))
        run.forwards += steps
        run.row_forwards += torch.where(active, (n - 1 - emitted).clamp(max=window - 1), 0).cpu()  # as if alone

    def _draft_branches(self, tree: Tree, tokens, noise, emitted) -> None:
        """Re-draft, in place, every tree token whose parent is off the main chain from the drafter's
        scores at that parent (pac continues a branch with the main chain's drafts, predicted after
        the main-chain token instead of the branch's). Level by level: one drafter forward over the
        tree down to depth t (keys in the cache's scratch slots, as the target's tree) scores the
        depth-t tokens, whose children at depth t + 1 are their parent's best tokens by rank."""
        run = self._run
        n, cond_len, params = run.num_tokens, run.cond_len, run.params
        spare, device = cond_len + n - 1, tokens.device
        rows = torch.arange(tokens.shape[0], device=device)[:, None]
        active, last = emitted < n, n - 2 - int(emitted.min())  # a level t is needed while t + 1 < N - e
        guided = guidance(params, emitted, len(tree.paths[0]), n)
        cfg2 = partial(cfg_halves, uses_cfg=params.uses_cfg)
        none = torch.zeros(cfg2(emitted).shape[0], 0, dtype=torch.long, device=device)
        for level in branch_levels(tree):
            if level.t > last:
                break
            sub, depth = torch.tensor(level.sub, device=device), torch.tensor(level.depths, device=device)
            at = emitted[:, None] + depth  # the image index each sub-tree token's output scores
            pos = torch.where(at - 1 < n - 1, cond_len + at - 1, spare)
            # the cache's tree mode sees only the keys of the forward's own tree (and the slots before
            # its root), so each level re-feeds the whole sub-tree, main-chain tokens included
            run.cache.set_tree(level.parents, cond_len + n)
            logits = run.model.decode(cfg2(tokens[:, sub]), cfg2(pos), run.cache)
            run.cache.keep_path(none, none)  # keep nothing: leave tree mode, the image slots untouched
            scores = process_logits(logits, params, guided if isinstance(guided, bool) else guided[:, depth])
            scores = scores[:, level.parent_of] + noise[rows, at[:, level.parent_of].clamp(max=noise.shape[1] - 1)]
            ranked = scores.topk(min(level.branches, scores.shape[-1]), dim=-1).indices  # [B, children, K]
            # (a vocabulary smaller than K repeats its last token, as pac: a duplicate never wins)
            rank = torch.tensor(level.ranks, device=device).clamp(max=ranked.shape[-1] - 1)
            rank = rank[None, :, None].expand(tokens.shape[0], -1, 1)
            tokens[:, list(level.children)] = ranked.gather(-1, rank)[..., 0]
            run.forwards += 1
            run.row_forwards += (active & (level.t <= n - 2 - emitted)).long().cpu()


@dataclass(frozen=True)
class BranchLevel:
    """One drafter tree forward of `_draft_branches`: the tree tokens of depth <= t (`sub`, in tree
    order, at `depths`; `parents` re-indexed within it), and the depth-(t + 1) tokens it re-drafts (`children`,
    those under a branch), each as rank `ranks[c]` of the scores at sub-tree token `parent_of[c]`."""

    t: int
    sub: tuple
    depths: tuple
    parents: tuple
    children: tuple
    parent_of: tuple
    ranks: tuple
    branches: int


@lru_cache(maxsize=32)
def branch_levels(tree: Tree) -> tuple:
    window, branches = len(tree.paths[0]), max(tree.ranks) + 1
    levels = []
    for t in range(1, max(tree.depths)):
        children = [j for j, d in enumerate(tree.depths) if d == t + 1 and tree.parents[j] >= window]
        if not children:  # every depth-(t + 1) token hangs off the main chain: already drafted
            continue
        sub = [i for i, d in enumerate(tree.depths) if d <= t]
        place = {i: k for k, i in enumerate(sub)}
        levels.append(BranchLevel(t, tuple(sub), tuple(tree.depths[i] for i in sub),
                                  tuple(place.get(tree.parents[i], -1) for i in sub), tuple(children),
                                  tuple(place[tree.parents[j]] for j in children),
                                  tuple(tree.ranks[j] for j in children), branches))
    return tuple(levels)
