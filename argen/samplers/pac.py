"""`pac`: proactive drafting with a token tree, after SJD-PAC (CVPR 2026). Lossless.

The observation behind SJD-PAC: a Jacobi window usually fails at its first draft, right after
a rejection, because that draft was predicted from a context that held the rejected token. So
after a rejection, draft several candidates for that position, not one, and verify them all in
the same forward with a tree attention mask (each token sees the cache, its ancestors and
itself); whichever candidate is right carries its own chain of later drafts.

Here the tree is: the root (the newest committed token), the main chain of L-1 Jacobi drafts,
and K-1 branches hanging off the root, each an alternative first draft followed by the main
chain's next D-1 drafts. The alternatives are the next-best tokens of the row that predicted
that position in the previous forward (its stale scores), the main draft being the best.

Verification uses `auto`'s sampling rule (argen.samplers.auto): every position k has Gumbel noise
g_k drawn once from the sample's stream, and its token is argmax(l_k + g_k) under its true
context. A tree token is right iff it equals that argmax at its parent; at most one candidate per
position can be. So the emitted tokens are exactly `auto`'s (the same seed gives the same image
with `pac`, `auto` and any window or tree), which makes this sampler lossless (Gumbel-max) and
its samples independent of batch, tree shape and timing. SJD-PAC verifies a tree with
recursive rejection sampling instead; the Gumbel coupling turns that into a comparison.

What is not here: SJD-PAC's adaptive continuation (verifying drafts after a rejection against
stale distributions). Its exactness rests on the paper's argument that image tokens forget
distant context; it is not implemented, so this sampler keeps only the part that is exact.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..checks import check_number
from ..errors import ArgenError
from .auto import gumbel_noise
from .base import Sampler, SamplerOutput, cfg_batch
from .logits import process_logits
from .speculative import guidance, leading_accepts


class PACSampler(Sampler):
    """PACSampler(window=16, branches=4, depth=3): main chain of `window` tokens (root included)
    plus branches-1 alternative first drafts, each followed by depth-1 drafts (tree of
    window + (branches-1)*depth tokens per forward)."""

    name = "pac"
    option_aliases = {"L": "window", "K": "branches", "D": "depth"}

    def __init__(self, window: int = 16, branches: int = 4, depth: int = 3):
        self.window = check_number("window (L)", window, 2, None, integer=True)
        self.branches = check_number("branches (K)", branches, 1, None, integer=True)
        self.depth = check_number("depth (D)", depth, 1, None, integer=True)
        if self.depth > self.window - 1:
            raise ArgenError(f"depth (D) must be at most window - 1 = {self.window - 1}, got {self.depth}")

    def __repr__(self) -> str:
        return f"PACSampler(window={self.window}, branches={self.branches}, depth={self.depth})"

    def layout(self, window: int, depth: int):
        """parents [T], depth of each token [T], and per branch its token index at each depth."""
        parents, depths = [-1] + list(range(window - 1)), list(range(window))
        for a in range(self.branches - 1):
            start = len(parents)
            for t in range(depth):
                parents.append(0 if t == 0 else start + t - 1)
                depths.append(t + 1)
        return parents, depths

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        if num_tokens < 2:
            raise ArgenError(f"{self!r} needs at least 2 tokens")
        cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
        batch, cond_len = cond.shape[0], model.condition_length(cond)
        L = min(self.window, num_tokens)
        D = min(self.depth, L - 1)
        K = self.branches
        parents, depths = self.layout(L, D)
        T = len(parents)
        scratch = cond_len + num_tokens
        cache = model.new_cache(cond_all.shape[0], scratch + T)
        if not hasattr(cache, "set_tree"):
            raise ArgenError(f"{self!r} needs a cache with set_tree(); this generator's cache has none")
        first = process_logits(model.prefill(cond_all, cache, mask_all), params, params.guided_at(0))
        device = first.device
        noise = gumbel_noise(streams, batch, num_tokens, model.vocab_size, device)
        noise = torch.cat([noise, noise.new_zeros(batch, L + 1, noise.shape[-1])], dim=1)  # scratch rows
        seq = noise.argmax(-1)  # blind drafts
        seq[:, 0] = (first + noise[:, 0]).argmax(-1)
        vocab = noise.shape[-1]
        alts = noise[:, 1].topk(min(K, vocab), dim=-1).indices[:, 1:]  # no stale row yet: random alternatives
        if alts.shape[1] < K - 1:
            alts = torch.cat([alts, alts[:, :1].expand(-1, K - 1 - alts.shape[1])], 1)

        depth_t = torch.tensor(depths, device=device)
        rows = torch.arange(batch, device=device)[:, None]
        main = torch.arange(L, device=device)
        # branch a, depth t (1..D): window index L + a*D + t - 1
        branch_idx = L + torch.arange(K - 1, device=device)[:, None] * D + torch.arange(D, device=device)  # [K-1, D]
        spare = cond_len + num_tokens - 1  # never a real tree position (the last token is never fed)
        emitted = torch.ones(batch, dtype=torch.long, device=device)
        rows_nfe = torch.ones(batch, dtype=torch.long, device=device)
        accepted = []
        bar = tqdm(total=num_tokens, disable=not progress, desc="tokens", leave=False)
        while int(emitted.min()) < num_tokens:
            lengths = (num_tokens - emitted).clamp(0, L)
            index = emitted[:, None] + main  # image index each main-chain token predicts
            # tokens: root, main drafts, then per branch its alternative and the main drafts after it
            chain = seq.gather(1, index - 1)  # [B, L]: x_{e-1}, d_e, ..., d_{e+L-2}
            branch_tokens = torch.cat([alts[:, :, None], chain[:, None, 2:D + 1].expand(-1, K - 1, -1)], 2)
            tokens = torch.cat([chain, branch_tokens.flatten(1)], 1)
            valid = depth_t[None, :] <= (lengths - 1).clamp(min=0)[:, None]  # a draft for an index < N
            valid[:, 0] = lengths > 0
            pos = torch.where(valid, cond_len + emitted[:, None] - 1 + depth_t, spare)
            guided = guidance(params, emitted, L)
            if not isinstance(guided, bool):
                guided = guided.gather(1, depth_t.clamp(max=L - 1)[None, :, None].expand(batch, -1, 1))
            cache.set_tree(parents, scratch)
            both_t, both_p = (torch.cat([tokens, tokens]), torch.cat([pos, pos])) if params.uses_cfg else (tokens, pos)
            logits = process_logits(model.decode(both_t, both_p, cache), params, guided)
            noise_at = (emitted[:, None] + depth_t).clamp(max=noise.shape[1] - 1)
            scores = logits + noise[rows, noise_at]
            y = scores.argmax(-1)  # [B, T]: the true next token of each tree token's path
            # main chain: leading right drafts; branch a: its alternative vs the root's y, then its chain
            n_main = leading_accepts((tokens[:, 1:L] == y[:, :L - 1]) & valid[:, 1:L])
            b_tok, b_y = tokens[:, branch_idx], y[:, branch_idx]  # [B, K-1, D]
            b_prev = torch.cat([y[:, :1, None].expand(-1, K - 1, 1), b_y[:, :, :-1]], 2)
            n_branch = leading_accepts((b_tok == b_prev) & valid[:, branch_idx])  # [B, K-1]
            n_all = torch.cat([n_main[:, None], n_branch], 1)
            n, winner = n_all.max(1)  # ties: the main chain (first)
            m = torch.where(lengths > 0, n + 1, 0)
            # the winning path's y at depths 0..L-1: y of the root, then of the path tokens; past a
            # branch's end, the main chain's (stale) y as drafts
            in_branch = (winner > 0)[:, None] & (main[None, :] >= 1) & (main[None, :] <= D)
            a = (winner - 1).clamp(min=0)
            path_idx = torch.where(in_branch, branch_idx[a].gather(1, (main - 1).clamp(0, D - 1)[None].expand(batch, -1))
                                   if K > 1 else main[None].expand(batch, -1), main[None].expand(batch, -1))
            path_y = y.gather(1, path_idx)
            seq.scatter_(1, index, path_y)  # emitted tokens (depth <= n), then the next drafts
            # keys of the root and the accepted tokens go to their positions
            keep = main[None, :] <= n[:, None]
            keep_pos = torch.where(keep & (lengths > 0)[:, None], cond_len + emitted[:, None] - 1 + main, spare)
            cfg2 = (lambda x: torch.cat([x, x])) if params.uses_cfg else (lambda x: x)
            cache.keep_path(cfg2(path_idx), cfg2(keep_pos))
            # alternatives for the next first draft: the runner-up tokens of the row that predicted
            # it (the path token at depth n+1), whose context held a wrong token
            stale = path_idx.gather(1, (n + 1).clamp(max=L - 1)[:, None])
            alts = scores[rows[:, 0], stale[:, 0]].topk(min(K, vocab), dim=-1).indices[:, 1:]
            if alts.shape[1] < K - 1:
                alts = torch.cat([alts, alts[:, :1].expand(-1, K - 1 - alts.shape[1])], 1)
            emitted = emitted + m
            kept = cond_len + emitted - 1
            cache.rewind(cfg2(kept))
            active = lengths > 0
            rows_nfe += active
            accepted.append(m.sum() / active.sum())
            if progress:
                bar.update(int(emitted.min()) - bar.n)
        bar.close()
        return SamplerOutput(tokens=seq[:, :num_tokens].clone(), num_forward_passes=1 + len(accepted),
                             accepted_per_forward=torch.stack(accepted).tolist() if accepted else [],
                             forwards_per_sample=rows_nfe.cpu())
