"""Spatially parallel decoding in the spirit of ZipAR (He et al., ICML 2025). Lossy; training-free.

Image tokens depend mostly on their neighbours above and to the left. So grid row r starts once
row r-1 holds `window` (w) tokens instead of waiting for all of it, and every open row advances
by one token per forward: one forward carries one query per open row. With an H x W grid the
image takes (H - 1) * w + W forwards (prefill included) instead of H * W: on 8 x 8, w = 2 gives
22 (2.9x) and w = 1 gives 15 (4.3x). w >= W is plain AR (same distribution, one row at a time).

One step, for each sample and each grid row r with c_r < W tokens (row r open):

* the query predicting token (r, c_r) is token (r, c_r - 1) at its raster position. The first
  token of a row is predicted at the position of the last token of the row above, (r-1, W-1);
  while that token does not exist yet, the query there is a stand-in: the newest token of row
  r-1 (ZipAR's "auxiliary" token). Its key is seen by that query only, and the real token
  overwrites it later;
* a row that has just finished and whose last token has not been fed gets one extra slot that
  only writes that token's key/value (its prediction, for (r+1, 0), was made by the stand-in);
* which keys a query sees: every position before it that holds a committed token. Positions of
  tokens not generated yet (the rest of the rows above) are hidden through the cache's
  `set_visible`, so a query never reads a stale or empty slot.

Every open row draws its token from the processed distribution of its query (the shared
`logits_to_probs`, CFG and `cfg_interval` by the index of the token predicted), with a fixed
budget of H uniforms per sample and step from the sample's own stream: a sample does not depend
on its batch. Queries of a step are packed per sample (T = the largest count in the batch,
padding at the spare last position that no real query reads).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..checks import check_number
from ..errors import ArgenError
from .base import Sampler, SamplerOutput, cfg_batch
from .logits import logits_to_probs
from .rng import sample_rows
from .speculative import draw_uniforms


class SpatialSampler(Sampler):
    """SpatialSampler(window=2): row r starts when row r-1 has `window` tokens (ZipAR's w)."""

    name = "spatial"
    aliases = ("zipar",)
    option_aliases = {"w": "window"}

    def __init__(self, window: int = 2):
        self.window = check_number("window (w)", window, 1, None, integer=True)

    def __repr__(self) -> str:
        return f"SpatialSampler(window={self.window})"

    @property
    def needs_grid(self) -> bool:
        return True

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        rows, cols = model.grid
        if rows * cols != model.num_positions:
            raise ArgenError(f"{self!r} needs one token per grid cell; grid {rows}x{cols} != {model.num_positions} positions")
        cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
        batch, cond_len = cond.shape[0], model.condition_length(cond)
        cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
        if not hasattr(cache, "set_visible"):
            raise ArgenError(f"{self!r} needs a cache with set_visible(); this generator's cache has none")
        probs = logits_to_probs(model.prefill(cond_all, cache, mask_all), params, params.guidance_at(0, num_tokens))
        device = probs.device

        def both(x):  # CFG: both halves get the same tokens, positions and visibility
            return torch.cat([x, x]) if params.uses_cfg else x

        image = torch.arange(num_tokens, device=device)
        cache.set_visible(both((cond_len + image).expand(batch, -1)),
                          both(torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)))
        row_ids = torch.arange(rows, device=device)
        row_len = (num_tokens - row_ids * cols).clamp(0, cols)  # a short image (num_tokens) ends mid-grid
        opens_at = min(self.window, cols)  # tokens in the row above that open a row (every row above is full)
        has_next = torch.cat([row_len[1:] > 0, torch.zeros(1, dtype=torch.bool, device=device)])
        spare = cond_len + num_tokens - 1  # the last token is never fed: padding queries sit there

        seq = torch.zeros(batch, num_tokens + 1, dtype=torch.long, device=device)  # column N: scratch
        u = draw_uniforms(streams, batch, rows, device)
        seq[:, 0] = sample_rows(probs, u[:, 0])
        count = torch.zeros(batch, rows + 1, dtype=torch.long, device=device)  # column H: scratch
        count[:, 0] = 1
        tail_fed = torch.zeros(batch, rows, dtype=torch.bool, device=device)
        rows_nfe = torch.ones(batch, dtype=torch.long, device=device)
        accepted = []
        bar = tqdm(total=num_tokens, disable=not progress, desc="tokens", leave=False)
        while True:
            c = count[:, :rows]
            done = c >= row_len
            above = torch.cat([torch.full_like(c[:, :1], cols), c[:, :-1]], dim=1)
            above_done = torch.cat([torch.ones_like(done[:, :1]), done[:, :-1]], dim=1)
            predict = ~done & (above >= opens_at)
            # the query predicting (r, c_r): token (r, c_r - 1); for c_r = 0 the last token of the
            # row above if it exists, else the newest token of the row above (a hidden stand-in)
            first = c == 0
            stand_in = predict & first & ~above_done
            src = torch.where(first, torch.where(above_done, row_ids * cols - 1, (row_ids - 1) * cols + above - 1),
                              row_ids * cols + c - 1)
            pos = torch.where(first, row_ids * cols - 1, row_ids * cols + c - 1)
            # a finished row whose last token no query has fed yet, while a row below still runs
            later_open = torch.flip(torch.cumsum(torch.flip((~done).long(), [1]), 1), [1]) - (~done).long() > 0
            below_started = torch.cat([c[:, 1:] > 0, torch.zeros_like(done[:, :1])], dim=1)
            tail = done & has_next & ~tail_fed & below_started & later_open
            # feeding (r, W-1) as the real first-token query of row r+1 also writes its key
            tail_fed |= torch.cat([predict[:, 1:] & first[:, 1:] & above_done[:, 1:], torch.zeros_like(done[:, :1])], 1)
            slot_valid = torch.cat([predict, tail], dim=1)  # [B, 2H]: H prediction slots, H tail slots
            width = int(slot_valid.sum(1).max())  # the one host read per step
            if width == 0:
                break
            slot_src = torch.cat([src, row_ids * cols + cols - 1 + 0 * c], dim=1)
            slot_pos = torch.cat([pos, row_ids * cols + cols - 1 + 0 * c], dim=1)
            slot_seen = torch.cat([predict & ~stand_in, tail], dim=1)  # committed tokens: keys others may see
            order = torch.sort((~slot_valid).to(torch.uint8), dim=1, stable=True).indices[:, :width]
            valid = slot_valid.gather(1, order)
            tokens = seq.gather(1, slot_src.clamp(0, num_tokens - 1).gather(1, order))
            positions = torch.where(valid, cond_len + slot_pos.gather(1, order), spare)
            seen = slot_seen.gather(1, order) & valid
            cache.set_visible(both(positions), both(seen))
            tail_fed |= tail
            guided = params.uses_cfg
            target = (slot_pos.gather(1, order) + 1).clamp(max=num_tokens - 1)  # image index each query predicts
            if params.uses_cfg and params.cfg_schedule != "constant":  # each target's scale (and interval)
                guided = params.guidance_rows(target, num_tokens)[..., None]
            elif params.uses_cfg and params.cfg_interval >= 0:
                guided = (target <= params.cfg_interval + 1)[..., None]
            probs = logits_to_probs(model.decode(both(tokens), both(positions), cache), params, guided)
            row_of = order.clamp(max=2 * rows - 1) % rows  # grid row of each slot (tail slots: discarded)
            u = draw_uniforms(streams, batch, rows, device)
            drawn = sample_rows(probs, u.gather(1, row_of))
            emit = valid & (order < rows)
            where = torch.where(emit, row_of * cols + count.gather(1, row_of), num_tokens)
            seq.scatter_(1, where, drawn)
            count.scatter_add_(1, torch.where(emit, row_of, rows), emit.long())
            emitted = emit.sum(1)
            active = emitted > 0
            rows_nfe += active
            accepted.append(emitted.sum() / active.sum())
            if progress:
                bar.update(int(count[:, :rows].sum(1).min()) - bar.n)
        bar.close()
        return SamplerOutput(tokens=seq[:, :num_tokens].clone(), num_forward_passes=1 + len(accepted),
                             accepted_per_forward=torch.stack(accepted).tolist() if accepted else [],
                             forwards_per_sample=rows_nfe.cpu())
