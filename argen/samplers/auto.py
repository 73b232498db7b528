"""`auto`: Jacobi decoding with per-position Gumbel noise and a measured cost model. Lossless.

Sampling rule. Each sample draws, once, Gumbel noise g_k [V] for every image position k from
its own stream; token k is argmax(l_k + g_k), l_k the processed logits of position k (the shared
`process_logits`: CFG, temperature, top-k/top-p). That is an exact sample of softmax(l_k)
(Gumbel-max), so the sampler draws AR's distribution. It also makes the image a deterministic
function of (seed, model): whatever window is used, whatever the drafts and batch, the emitted
tokens are those of "AR with this noise". So the window can change at every step, chosen from
timings, without changing a single sample (the determinism contract holds even though timings
differ from run to run).

Verification. The window [x_{e-1}, d_e, ..., d_{e+T-2}] gives y_j = argmax(l_{e+j} + g_{e+j})
for every row; draft d_{e+j} is right iff it equals y_j, and the first n right drafts plus y_n
are emitted (y_n has an all-correct context). The rows after become the next drafts (Jacobi;
the fixed noise is a coupling of successive drafts, as in MC-SJD's Gumbel variant); positions
never reached hold a blind draft, argmax(g_k) (uniform).

Cost model. A T-token forward is not free on a CPU (docs/benchmarks.md: 1.2x to 12x a 1-token one,
growing with batch). At the first call for a (model, rows, device, condition length, image length)
the sampler times one step at each candidate width T in 1, 2, 4, .. max_window (best of a few
repeats; cached for the process), stopping at the first T that costs more than max(2, T/2)
one-token steps (it would need that many tokens per step to pay; these models give under 3). Then,
before each step, it picks the T that maximises expected tokens per unit of cost, E[m(T)] /
cost(T), with E[m(T)] = 1 + sum_{j<T} prod_{i<=j} a_i from per-depth acceptance rates a_i observed
so far for this model (kept across calls; only drafts some forward predicted count, and the prior
is worth PRIOR_WEIGHT trials, so the blind first windows of an image cannot vote a whole process to
AR). T = 1 is plain AR (one token per forward), so where no window pays, auto runs AR. Width 1 is
timed on the loop AR runs on (`_ar_rest`). Each measured step, bookkeeping included, is folded into
its width's estimate (weight COST_UPDATE), AR's as well as the windows', so a start-up probe that
flattered either side (best of a few bare steps, at a quiet moment) is corrected within a few
steps; a window whose estimate no real step backs yet is still tried while it might pay
(`VERIFY_STEPS`), since AR steps never measure one. Near the image's end the window stays a probed
width (rows past the end pad): a compiled step builds one graph per width.

`window=<int>` fixes the width (no timing): the same samples, for measuring compression.
"""

from __future__ import annotations

import time
import weakref
from typing import Optional, Union

import torch

from ..checks import check_number
from .base import ForwardTally, Sampler, SamplerOutput, cfg_batch
from .logits import process_logits
from .speculative import covering_width, guidance, leading_accepts, window_inputs

# model -> {"costs": {key: {T: seconds}}, "hits": [..], "tries": [..]} (dropped with the model)
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Per-depth acceptance before any observation, worth PRIOR_WEIGHT trials. The first window steps of
# an image verify drafts predicted from blind context and nearly all fail; with 4 pseudo-trials,
# four such misses at batch 4 voted the run to AR, and AR steps add no acceptance data, so it
# stayed there for the process although windows paid (docs/benchmarks.md, issue 17, "Session 17").
PRIOR_ACCEPT, PRIOR_WEIGHT = 0.5, 32.0
COST_UPDATE = 0.3  # weight of each measured window step in its width's cost estimate
# A probed window cost is a few bare steps and can be far off: at batch 4 (bf16, compiled) one probe
# timed a 4-token step at 3.93 ms that really took 2.85 ms (0.73x), and AR, once chosen, never
# measures a window again. So a window whose estimate rests on fewer than VERIFY_STEPS real steps is
# still tried when it would pay at PROBE_DOUBT times its estimate (a window far dearer is not).
VERIFY_STEPS, PROBE_DOUBT = 5, 0.7


def gumbel_noise(streams, batch: int, positions: int, vocab: int, device, scratch: int = 0) -> torch.Tensor:
    """[batch, positions + scratch, vocab] float32: Gumbel(0, 1) noise for the positions, sample i
    from stream i, position by position (position k always takes the k-th block of V numbers of
    its stream), then `scratch` rows of zeros. -log(-log(u)) in float64, computed in place and
    written once into the preallocated result (this is most of what auto adds to an AR run)."""
    if streams is None:
        g = torch.rand(batch, positions, vocab, dtype=torch.float64).log_()
    else:
        g = torch.log(streams.uniform(positions, vocab))  # a new tensor: the streams' buffer is left alone
    out = torch.zeros(batch, positions + scratch, vocab, device=device)
    out[:, :positions].copy_(g.neg_().log_().neg_())
    return out


def model_state(model) -> dict:
    try:
        return _STATE.setdefault(model, {"costs": {}, "hits": [], "tries": [], "real": {}})
    except TypeError:  # not weak-referenceable: keep nothing across calls
        return {"costs": {}, "hits": [], "tries": [], "real": {}}


def expected_tokens(hits, tries, widest: int) -> list:
    """E[tokens per step] of a width-T window for T = 1..widest (index T-1), under the per-depth
    acceptance estimates: 1 + sum_{j<T} prod_{i<=j} a_i."""
    out, total, run = [1.0], 1.0, 1.0
    for depth in range(1, widest):
        h = hits[depth - 1] if depth - 1 < len(hits) else 0.0
        t = tries[depth - 1] if depth - 1 < len(tries) else 0.0
        run *= (h + PRIOR_ACCEPT * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT)
        total += run
        out.append(total)
    return out


class AutoSampler(Sampler):
    """AutoSampler(window="auto", max_window=32, repeats=3).

    window: "auto" (cost model, the width chosen per step) or a fixed width (1 = AR).
    max_window: the widest window the cost model may pick. repeats: timed steps per width."""

    name = "auto"
    aliases = ("gumbel",)
    option_aliases = {"L": "window"}

    def __init__(self, window: Union[str, int] = "auto", max_window: int = 32, repeats: int = 3):
        if not (isinstance(window, str) and window == "auto"):
            window = check_number("window (L)", window, 1, None, integer=True)
        self.window = window
        self.max_window = check_number("max_window", max_window, 1, 1024, integer=True)
        self.repeats = check_number("repeats", repeats, 1, 100, integer=True)
        self.last_widths: list = []  # widths of the last call's steps (for benchmarks and tests)

    def __repr__(self) -> str:
        return f"AutoSampler(window={self.window!r}, max_window={self.max_window})"

    # ---- one step ------------------------------------------------------------------------

    @staticmethod
    def _step(model, seq, emitted, noise, width: int, cache, cond_len: int, num_tokens: int, params):
        """Feed a window of `width`, emit the verified tokens, keep the rest as drafts.
        Returns (m [B] tokens emitted, n [B] drafts accepted, lengths [B])."""
        lengths = (num_tokens - emitted).clamp(0, width)
        tokens, pos = window_inputs(seq, emitted, width, cond_len, num_tokens)
        both_tokens, both_pos = (torch.cat([tokens, tokens]), torch.cat([pos, pos])) if params.uses_cfg else (tokens, pos)
        guided = guidance(params, emitted, width, num_tokens)
        logits = process_logits(model.decode(both_tokens, both_pos, cache), params, guided)
        index = emitted[:, None] + torch.arange(width, device=seq.device)
        rows = torch.arange(seq.shape[0], device=seq.device)[:, None]
        y = (logits + noise[rows, index.clamp(max=noise.shape[1] - 1)]).argmax(-1)
        has_draft = torch.arange(width - 1, device=seq.device) < (lengths - 1)[:, None]
        n = leading_accepts((tokens[:, 1:] == y[:, :-1]) & has_draft)
        m = torch.where(lengths > 0, n + 1, 0)
        # y[:, :n+1] are the emitted tokens (y_j == d_j for j < n), y[:, n+1:] the next drafts;
        # rows past the image (finished rows, the end of a short one) write scratch columns
        seq.scatter_(1, index, y)
        emitted = emitted + m
        kept = cond_len + emitted - 1
        cache.rewind(torch.cat([kept, kept]) if params.uses_cfg else kept)
        return emitted, m, n, lengths

    @staticmethod
    def _ar_rest(model, seq, start: int, noise, cache, cond_len: int, num_tokens: int, params,
                 stop: Optional[int] = None) -> None:
        """Image indices start..stop-1 (default N-1) for every row, one forward each: the AR sampler's step
        (argen.samplers.ar.decode_one_token: one shared position, advanced in place) with the
        Gumbel rule in place of its draw. The same tokens as `_ar_step`."""
        input_pos = torch.tensor([cond_len + start - 1], device=seq.device)
        scheduled = params.uses_cfg and params.cfg_schedule != "constant"
        for k in range(start, num_tokens if stop is None else stop):
            x = seq[:, k - 1:k]
            if params.uses_cfg:
                x = torch.cat([x, x])
            if scheduled:  # the window path's float32 scale table, so the numbers are the same
                guided = guidance(params, torch.full((1,), k, device=seq.device), 1, num_tokens)[:, 0]
            else:
                guided = params.guided_at(k)
            logits = process_logits(model.decode(x, input_pos, cache)[:, -1], params, guided)
            seq[:, k] = (logits + noise[:, k]).argmax(-1)
            input_pos += 1

    @staticmethod
    def _ar_step(model, seq, emitted, noise, cache, cond_len: int, num_tokens: int, params, shared=None):
        """Width 1 (plain AR under the Gumbel rule) without the window machinery: one token per
        active row, nothing to verify and nothing to rewind (the cache keeps what it wrote)."""
        rows = torch.arange(seq.shape[0], device=seq.device)
        active = emitted < num_tokens
        tokens = seq.gather(1, (emitted - 1)[:, None])
        if shared is not None:  # every row at the same token: one position for all, as the AR sampler
            pos = torch.tensor([cond_len + shared - 1], device=seq.device)  # (the cache's one-kernel write)
        else:
            pos = (cond_len + emitted - 1).clamp(max=cond_len + num_tokens - 1)[:, None]
        if params.uses_cfg:
            tokens = torch.cat([tokens, tokens])
            pos = pos if shared is not None else torch.cat([pos, pos])
        guided = guidance(params, emitted, 1, num_tokens)
        guided = guided if isinstance(guided, bool) else guided[:, 0]
        logits = process_logits(model.decode(tokens, pos, cache)[:, 0], params, guided)
        y = (logits + noise[rows, emitted]).argmax(-1)
        seq[rows, emitted] = y  # finished rows write their scratch column N
        return emitted + active, active.long(), torch.zeros_like(emitted), active.long()

    # ---- cost model ----------------------------------------------------------------------

    def _costs(self, model, cond_all, mask_all, cond_len, num_tokens, params, batch, state) -> tuple:
        """(costs {width: seconds per step}, real {width: real steps folded in}) for this shape."""
        widths = [w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if w <= min(self.max_window, num_tokens)]
        device = model_device(model)
        key = (cond_all.shape[0], str(device), cond_len, num_tokens, params.uses_cfg, tuple(widths))
        if key not in state["costs"]:
            cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
            model.prefill(cond_all, cache, mask_all)
            extra = max(widths) + 1
            vocab = model.vocab_size
            seq = torch.zeros(batch, num_tokens + extra, dtype=torch.long, device=device)
            noise = torch.zeros(batch, num_tokens + extra, vocab, device=device)
            start = torch.full((batch,), max(1, (num_tokens - max(widths)) // 2), dtype=torch.long, device=device)
            seconds = {}
            for w in widths:
                best = float("inf")
                for r in range(self.repeats + 1):  # the first is a warm-up
                    t0 = time.perf_counter()
                    if w == 1:  # the path AR runs on (`_ar_rest`), one step
                        at = int(start[0])
                        self._ar_rest(model, seq, at, noise, cache, cond_len, num_tokens, params, stop=at + 1)
                    else:
                        self._step(model, seq, start, noise, w, cache, cond_len, num_tokens, params)
                    if r:
                        best = min(best, time.perf_counter() - t0)
                seconds[w] = best
                if best > seconds[1] * max(2.0, w / 2):
                    # it would need over max(2, w/2) tokens per step to pay (these models give
                    # under 3), and wider windows cost more still: stop timing them
                    break
            state["costs"][key] = seconds
        return state["costs"][key], state["real"].setdefault(key, {})

    def _choose(self, costs, state, emitted, num_tokens, real=None) -> int:
        """The width with the most expected tokens per second; with `real` (real steps measured
        per width), AR's turn goes to a window not yet verified that would pay at PROBE_DOUBT x
        its estimated cost."""
        active = [r for r in (num_tokens - emitted).tolist() if r > 0]
        gains = expected_tokens(state["hits"], state["tries"], max(costs))
        values = {w: sum(gains[min(w, r) - 1] for r in active) / cost for w, cost in costs.items()}
        best = max(values, key=values.get)
        if best == 1 and real is not None:
            doubted = {w: v / PROBE_DOUBT for w, v in values.items() if w > 1 and real.get(w, 0) < VERIFY_STEPS}
            if doubted and max(doubted.values()) > values[1]:
                return max(doubted, key=doubted.get)
        return best

    # ---- loop ----------------------------------------------------------------------------

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
        batch, cond_len = cond.shape[0], model.condition_length(cond)
        state = model_state(model)
        costs = real = None
        if self.window == "auto":
            costs, real = self._costs(model, cond_all, mask_all, cond_len, num_tokens, params, batch, state)
        cap = self.max_window if self.window == "auto" else self.window
        cap = min(cap, num_tokens)
        cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
        first = process_logits(model.prefill(cond_all, cache, mask_all), params, params.guidance_at(0, num_tokens))
        device = first.device
        noise = gumbel_noise(streams, batch, num_tokens, model.vocab_size, device, scratch=cap + 1)
        seq = torch.zeros(noise.shape[:2], dtype=torch.long, device=device)
        seq[:, 0] = (first + noise[:, 0]).argmax(-1)
        drafted = False  # blind drafts are written before the first window step (an AR run needs none)
        emitted = torch.ones(batch, dtype=torch.long, device=device)
        # image indices below reach[b] have been predicted by some forward; a draft at or past it
        # is blind (argmax of the noise), so it says nothing about how well windows verify
        reach = emitted.clone()
        tally, widths = ForwardTally(batch, num_tokens, device, progress), []
        while True:
            low, high = (int(v) for v in emitted.aminmax())  # the step's host reads, once each
            left = num_tokens - low
            if left <= 0:
                break
            widest = cap if costs is None else self._choose(costs, state, emitted, num_tokens, real)
            width = covering_width(left, widest)  # near the image's end a power of two (a probed width)
            if width == 1 and high == low:
                # every row at the same token and AR chosen: AR stays the choice to the end (the
                # rows stay in step, and a window's expected tokens only fall as the image
                # runs out, while no window step adds acceptance data), so finish with the AR
                # sampler's loop: one shared position, no per-step choice or bookkeeping
                began = time.perf_counter()
                self._ar_rest(model, seq, low, noise, cache, cond_len, num_tokens, params)
                steps = num_tokens - low
                if costs is not None:  # AR's real step too, so neither side is judged by a lucky probe
                    costs[1] = (1 - COST_UPDATE) * costs[1] + COST_UPDATE * (time.perf_counter() - began) / steps
                tally.record_ar(steps)
                widths.extend([1] * steps)
                emitted = torch.full_like(emitted, num_tokens)
                continue
            if width == 1:
                shared = low if high == low else None
                emitted, m, n, lengths = self._ar_step(model, seq, emitted, noise, cache, cond_len, num_tokens,
                                                       params, shared)
            else:
                if not drafted:  # no window step yet, so no row has a token at or past `high`
                    seq[:, high:] = noise[:, high:].argmax(-1)  # one uniform token per position
                    drafted = True
                began = time.perf_counter()  # (after the one-off blind drafts: they are no step's cost)
                informed = reach - emitted  # drafts of depth 1 .. informed were predicted
                reach = torch.maximum(reach, emitted + width)
                emitted, m, n, lengths = self._step(model, seq, emitted, noise, width, cache, cond_len, num_tokens,
                                                    params)
            tally.record(m, lengths > 0, emitted.min)
            widths.append(width)
            if width > 1:
                self._observe(state, n, lengths, width, informed)
                if costs is not None:
                    # the start-up probe times the bare step at its best; a real step also pays
                    # the bookkeeping around it (and the load of the moment): fold what it
                    # really cost into the estimate, so a window that does not pay loses to AR
                    costs[width] = (1 - COST_UPDATE) * costs[width] + COST_UPDATE * (time.perf_counter() - began)
                    real[width] = real.get(width, 0) + 1
        self.last_widths = widths
        return tally.output(seq[:, :num_tokens].clone())

    @staticmethod
    def _observe(state, n, lengths, width: int, informed) -> None:
        """Depth j's draft was tested when the j-1 before it were right (and the row had it).
        Only predicted drafts count (depth j <= informed [B]): a blind draft is a uniform token,
        no evidence of how well this model's windows verify."""
        depths = torch.arange(1, width, device=n.device)
        tested = (n[:, None] >= depths - 1) & (depths <= lengths[:, None] - 1) & (depths <= informed[:, None])
        hit = tested & (n[:, None] >= depths)
        t, h = tested.sum(0).tolist(), hit.sum(0).tolist()
        hits, tries = state["hits"], state["tries"]
        while len(tries) < len(t):
            tries.append(0.0)
            hits.append(0.0)
        for j in range(len(t)):
            tries[j] += t[j]
            hits[j] += h[j]


def model_device(model) -> torch.device:
    emb = model.token_embeddings() if hasattr(model, "token_embeddings") else None
    return emb.device if emb is not None else torch.device("cpu")
