"""Spatially parallel decoding in the spirit of ZipAR (He et al., ICML 2025), optionally stacked
with Jacobi decoding. Lossy (the spatial part only); training-free.

Image tokens depend mostly on their neighbours above and to the left. So grid row r starts once
row r-1 holds `window` (w) tokens instead of waiting for all of it, and every open row advances
in the same forward: one forward carries the queries of every open row. With one token per row
and forward (L = 1) an H x W grid takes (H - 1) * w + W forwards (prefill included) instead of
H * W: on 8 x 8, w = 2 gives 22 (2.9x) and w = 1 gives 15 (4.3x). w >= W is plain AR order (the
same distribution, one row at a time).

The dependency structure (what each token is predicted from) is that of L = 1, whatever L:

* token (r, c) is predicted by one query. For c > 0 it is token (r, c - 1) at its raster
  position. For c = 0 it sits at the position of the last token of the row above, (r-1, W-1),
  and is a stand-in: token (r-1, min(w, W) - 1), the newest of row r-1 when row r opens (ZipAR's
  "auxiliary" token; for w >= W the real last token). A stand-in's key is seen by its own query
  only; the real token's key overwrites it later;
* the query of (r, c) sees: the first min(W, c + k*w) tokens of row r-k (k >= 1; what that row
  held when row r reached c, rows running w apart), the tokens of row r before c, and itself.
  Every key it sees was computed the same way when its token was fed;
* a finished row whose last token has not been fed gets one extra slot that only writes that
  token's key (its prediction, for (r+1, 0), was made by the stand-in), once the row below has
  used the stand-in slot and while a row below still runs.

Each query's key set goes to the cache's per-query mask (`set_query_mask`), so no query reads a
slot of a token not generated yet, a stale draft, or a stand-in.

L = 1 (`jacobi_window`, spec key L): each open row emits one token per forward, drawn from the
processed distribution of its query (the shared `process_logits`, CFG, `cfg_interval` and
guidance schedules by the index of the token predicted) with a fixed budget of H uniforms per
sample and step from the sample's own stream.

L >= 2 (stacked with Jacobi): each running row, and the next row to open once the row above
has begun, feeds a window [query token, drafts of its next L - 1 tokens], and every query
predicts under `auto`'s rule: token k = argmax(l_k + g_k), with the Gumbel noise g_k drawn once
per sample and image position (`argen.samplers.auto.gumbel_noise`). A query sees the drafts of
its own window before it and, of the rows above, what its structure allows among their committed
tokens and their drafts of this forward. Acceptance goes top down: a query counts only if every
key it needed is right, i.e. committed or a draft its row accepted in this forward; its row emits
the leading drafts that equal the prediction before them, plus one more token; all other
predictions are the next drafts (positions never predicted hold argmax(g_k), auto's blind
draft). So the tokens are a fixed function of (seed, model) and the structure above: the same
for every L >= 2, and for w >= W exactly `auto`'s (AR with the same noise); only the spatial
structure is lossy. (L = 1 keeps its own draws, so it samples what it always did.)

A generator with k codes per position (token-shuffle) fills each grid cell with its k codes at once:
L = 1 draws them with k uniforms (H * k per sample and step), L >= 2 gives each its own noise
(`argen.samplers.auto.position_noise`) and accepts a draft cell only when all its codes are right.

Queries of a step are packed per sample (T = the largest count in the batch, padding at the spare
last position, which no real query reads): a sample does not depend on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_number
from ..errors import ArgenError
from .auto import code_axis, position_noise
from .base import ForwardTally, Sampler, SamplerOutput, cfg_batch, cfg_halves
from .logits import process_logits
from .rng import sample_rows
from .speculative import draw_uniforms, guidance_of, leading_accepts, over_codes, per_position, same_positions


class SpatialSampler(Sampler):
    """SpatialSampler(window=2, jacobi_window=1): row r starts when row r-1 has `window` tokens
    (ZipAR's w); each open row advances by a Jacobi window of up to `jacobi_window` (L) tokens
    per forward (L = 1: one drawn token)."""

    name = "spatial"
    aliases = ("zipar",)
    multi_code = True  # k codes per position: a grid cell's codes are drawn (or verified) together
    option_aliases = {"w": "window", "L": "jacobi_window"}

    def __init__(self, window: int = 2, jacobi_window: int = 1):
        self.window = check_number("window (w)", window, 1, None, integer=True)
        self.jacobi_window = check_number("jacobi_window (L)", jacobi_window, 1, None, integer=True)

    def __repr__(self) -> str:
        jacobi = f", jacobi_window={self.jacobi_window}" if self.jacobi_window > 1 else ""
        return f"SpatialSampler(window={self.window}{jacobi})"

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
        if not hasattr(cache, "set_query_mask"):
            raise ArgenError(f"{self!r} needs a cache with set_query_mask(); this generator's cache has none")
        first = process_logits(model.prefill(cond_all, cache, mask_all), params, params.guidance_at(0, num_tokens))
        device = first.device

        def both(x):  # CFG: both halves get the same tokens, positions and masks
            return cfg_halves(x, params.uses_cfg)

        jacobi = self.jacobi_window > 1
        width_cap = min(self.jacobi_window, cols)  # a window never leaves its row
        codes, k = code_axis(model), model.tokens_per_position  # seq [B, N + 1] or [B, N + 1, k]

        def uniforms():  # a fixed budget per step: one number per grid row and code
            return draw_uniforms(streams, batch, rows * k, device).view(batch, rows, *codes)

        if jacobi:
            noise = position_noise(streams, model, batch, num_tokens, device, scratch=1)
            seq = noise.argmax(-1)  # blind drafts (auto's); column N: scratch
            seq[:, 0] = (first + noise[:, 0]).argmax(-1)
        else:
            seq = torch.zeros(batch, num_tokens + 1, *codes, dtype=torch.long, device=device)  # column N: scratch
            seq[:, 0] = sample_rows(F.softmax(first, dim=-1), uniforms()[:, 0])

        row_ids = torch.arange(rows, device=device)
        row_len = (num_tokens - row_ids * cols).clamp(0, cols)  # a short image (num_tokens) ends mid-grid
        opens_at = min(self.window, cols)  # tokens of row r-1 that open row r (its stand-in is the last of them)
        has_next = torch.cat([row_len[1:] > 0, torch.zeros(1, dtype=torch.bool, device=device)])
        spare = cond_len + num_tokens - 1  # the last token is never fed: padding queries sit there
        lag = (row_ids[:, None] - row_ids[None, :]) * self.window  # [r, r']: (r - r') * w
        lag = torch.where(row_ids[None, :] < row_ids[:, None], lag, -1)  # only rows above limit row r
        j_ids = torch.arange(width_cap, device=device)

        def room(keyed, c, r=slice(None)):
            """[B, H] (or [B, 1] for rows=[r]): how many queries of each row's window have their whole
            context among the first `keyed` [B, H] keys of the rows above: query j of row r (token
            (r, c_r + j)) needs min(W, c_r + j + k*w) of row r-k."""
            return torch.where((lag[r] >= 0) & (keyed[:, None, :] < cols),
                               keyed[:, None, :] - lag[r] - c[:, r, None] + 1, width_cap).amin(-1)

        image = torch.arange(num_tokens, device=device)
        image_row, image_col = image // cols, image % cols
        # every prediction slot (row r, window index j), then one tail slot per row
        slot_row = torch.cat([row_ids.repeat_interleave(width_cap), row_ids])
        is_prediction = torch.arange(slot_row.shape[0], device=device) < rows * width_cap

        count = torch.zeros(batch, rows, dtype=torch.long, device=device)  # committed tokens per row
        count[:, 0] = 1
        tail_fed = torch.zeros(batch, rows, dtype=torch.bool, device=device)
        tally = ForwardTally(batch, num_tokens, device, progress)
        while True:
            c = count
            done = c >= row_len
            later_open = torch.flip(torch.cumsum(torch.flip((~done).long(), [1]), 1), [1]) - (~done).long() > 0
            below_started = torch.cat([c[:, 1:] > 0, torch.zeros_like(done[:, :1])], dim=1)
            tail = done & has_next & ~tail_fed & below_started & later_open
            # for w >= W, row r+1 opens on the real last token of row r, whose key it writes
            real_open = torch.cat([c[:, 1:] == 0, torch.zeros_like(done[:, :1])], dim=1) & has_next & (opens_at == cols)
            # tokens of each row whose keys are in the cache once this forward has written its own
            # (a running row feeds its newest token; a finished one lacks its last until the tail)
            fed = torch.where(done, cols - 1 + (tail_fed | tail | real_open).long(), c)
            size = torch.minimum(row_len - c, room(fed, c)).clamp(min=0)  # queries sure to be complete
            opening = (c == 0) & (size > 0)
            tail_fed |= torch.cat([opening[:, 1:], torch.zeros_like(done[:, :1])], 1) & (opens_at == cols)
            above = torch.cat([torch.full_like(c[:, :1], cols), c[:, :-1]], dim=1)  # tokens of the row above
            if jacobi:
                # every running row feeds a full window, and so does the next row to open once the row
                # above has begun: queries past `size` see the drafts of the rows above in this forward
                # and count if those drafts are accepted (below); otherwise they only draft
                drafting = (size > 0) | (~done & ((c > 0) | ((above > 0) & (above < cols))))
                span = torch.where(drafting, torch.clamp(row_len - c, max=width_cap), 0)
            else:
                span = size
            # keys of each row a query may read in this forward: committed ones and this forward's drafts
            reach = torch.where(done, fed, c + (span - 1).clamp(min=0))

            col = c[:, :, None] + j_ids  # [B, H, L]: the column each prediction slot predicts
            first_of_row = (c[:, :, None] == 0) & (j_ids == 0)
            here = row_ids[:, None] * cols + col - 1  # the query token's own index
            stand_in = (row_ids[:, None] - 1) * cols + opens_at - 1  # committed, or the draft of it
            slot_valid = torch.cat([(j_ids < span[:, :, None]).flatten(1), tail], dim=1)
            width = int(slot_valid.sum(1).max())  # the one host read per step
            if width == 0:
                if bool((c < row_len).any()):
                    raise RuntimeError(f"{self!r} stalled with rows unfinished")  # a bug, not bad input
                break
            last = row_ids * cols + cols - 1
            slot_src = torch.cat([torch.where(first_of_row, stand_in, here).flatten(1), last.expand(batch, -1)], dim=1)
            slot_pos = torch.cat([torch.where(first_of_row, row_ids[:, None] * cols - 1, here).flatten(1),
                                  last.expand(batch, -1)], dim=1)
            slot_col = torch.cat([col.flatten(1), torch.full_like(c, cols)], dim=1)  # a tail sees its whole row
            slot_tokens = seq.gather(1, over_codes(slot_src.clamp(0, num_tokens - 1), seq))
            order = torch.sort((~slot_valid).to(torch.uint8), dim=1, stable=True).indices[:, :width]
            valid = slot_valid.gather(1, order)
            q_row, q_col, q_pos = slot_row[order], slot_col.gather(1, order), slot_pos.gather(1, order)
            tokens = slot_tokens.gather(1, over_codes(order, seq))
            positions = torch.where(valid, cond_len + q_pos, spare)

            # each query's keys: the structure above, its own slot, the condition; padding keeps the cache's rules
            k_above = (q_row[..., None] - image_row) * self.window
            limit = torch.minimum((q_col[..., None] + k_above).clamp(max=cols),
                                  reach.gather(1, image_row.expand(batch, -1))[:, None])
            sees = ((image_row < q_row[..., None]) & (image_col < limit)) \
                | ((image_row == q_row[..., None]) & (image_col < q_col[..., None])) \
                | (image == q_pos[..., None]) | ~valid[..., None]
            condition = torch.ones(batch, width, cond_len, dtype=torch.bool, device=device)
            cache.set_query_mask(both(torch.cat([condition, sees], dim=-1)))
            target = (q_row * cols + q_col).clamp(max=num_tokens - 1)  # image index each query predicts
            logits = process_logits(model.decode(both(tokens), both(positions), cache), params,
                                    per_position(guidance_of(params, target, num_tokens), seq))
            if jacobi:
                noise_at = torch.where(valid & is_prediction[order], target, num_tokens)
                drawn = (logits + noise[torch.arange(batch, device=device)[:, None], noise_at]).argmax(-1)
            else:
                drawn = sample_rows(F.softmax(logits, dim=-1), uniforms().gather(1, over_codes(q_row, seq)))

            # back to the [B, H, L] layout: verify each row's drafts, emit, keep the rest as drafts
            predicted = torch.zeros_like(slot_tokens).scatter_(1, over_codes(order, seq), drawn)[:, : rows * width_cap]
            predicted = predicted.view(batch, rows, width_cap, *codes)
            if jacobi:
                # top down: the drafts a row accepts are keys the rows below may have counted on
                drafts = slot_tokens[:, : rows * width_cap].view(batch, rows, width_cap, *codes)[:, :, 1:]
                right = same_positions(drafts.flatten(1, 2), predicted[:, :, :-1].flatten(1, 2)).view(batch, rows, -1)
                keyed, emit = fed.clone(), torch.zeros_like(c)
                for r in range(rows):
                    complete = torch.minimum(span[:, r], room(keyed, c, [r])[:, 0]).clamp(min=0)
                    n = leading_accepts(right[:, r] & (j_ids[1:] < complete[:, None]))
                    emit[:, r] = torch.where(complete > 0, n + 1, 0)
                    keyed[:, r] = torch.where(done[:, r], fed[:, r], c[:, r] + n)
            else:
                emit = size
            written = torch.where(j_ids < span[:, :, None], row_ids[:, None] * cols + col, num_tokens)
            seq.scatter_(1, over_codes(written.flatten(1), seq), predicted.flatten(1, 2))
            count += emit
            tail_fed |= tail
            emitted = emit.sum(1)
            active = emitted > 0
            if not bool(active.any()):
                raise RuntimeError(f"{self!r} stalled with rows unfinished")  # a bug, not bad input
            tally.record(emitted, active, lambda: count.sum(1).min())
        return tally.output(seq[:, :num_tokens].flatten(1).clone())  # position-major codes
