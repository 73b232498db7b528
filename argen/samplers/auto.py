"""`auto`: Jacobi decoding with per-position Gumbel noise and a measured cost model. Lossless.

Sampling rule. Each sample draws, once, Gumbel noise g_k [V] for every image position k from
its own stream; token k is argmax(l_k + g_k), l_k the processed logits of position k (the shared
`process_logits`: CFG, temperature, top-k/top-p). That is an exact sample of softmax(l_k)
(Gumbel-max), so the sampler draws AR's distribution. It also makes the image a deterministic
function of (seed, model): whatever window is used, whatever the drafts and batch, the emitted
tokens are those of "AR with this noise". So the window can change at every step, chosen from
timings, without changing a single sample (the determinism contract holds even though timings
differ from run to run).

A generator with k codes per position (token-shuffle) gets noise for each code of each position
(code c of position p takes the stream's block p * k + c), each code is the argmax of its own
scores, and a draft position is right when all its k codes are. The codes of a position are
independent given the prefix, so this is again an exact sample, and the same rule throughout.

Verification. The window [x_{e-1}, d_e, ..., d_{e+T-2}] gives y_j = argmax(l_{e+j} + g_{e+j})
for every row; draft d_{e+j} is right iff it equals y_j, and the first n right drafts plus y_n
are emitted (y_n has an all-correct context). The rows after become the next drafts (Jacobi;
the fixed noise is a coupling of successive drafts, as in MC-SJD's Gumbel variant); positions
never reached hold a blind draft, argmax(g_k) (uniform).

Cost model. A T-token forward is not free on a CPU (docs/benchmarks.md: 1.2x to 12x a 1-token one,
growing with batch). At the first call for a (model, rows, device, condition length, image length)
the sampler times one step at each candidate width T in 1, 2, 4, .. max_window (after a few
untimed AR steps, the best of a few repeats and one interleaved round; cached for the process),
stopping at the first T that costs more than max(2, T/2) one-token steps (it would need that many
tokens per step to pay; these models give under 3). Then, before each step, it picks the T that
maximises the batch's expected progress per unit of cost:
- A row is expected to emit E[m(T)] = 1 + sum_{j<T} prod_{i<=j} a_i tokens per step, from
  per-depth acceptance rates a_i observed so far for this model (kept across calls; only drafts
  some forward predicted count, and the prior is worth PRIOR_WEIGHT trials, so the blind first
  windows of an image cannot vote a whole process to AR).
- Acceptance measured at one width underrates a wider one, whose far drafts have been refined over
  more steps (learnt at width 8, the model promised width 16 2.2 tokens a step; it gave 3.0), so
  each width's real steps on this shape then take over (the promise is worth PRIOR_STEPS of them).
- A batch ends with its slowest row, so progress is how far the lowest emitted index moves per
  step; at batch 16 that is far less than a row's mean (and acceptance learnt at batch 1 picked
  windows that lost 20% there). The extra tokens are scaled by the ratio of the two measured on
  this shape (`skew`, exactly 1 at batch 1).
- A window started from AR (or at the image's start) first spends a few steps on drafts that are
  blind or predicted from blind ones, so a cold start is judged over the rest of the image, its
  warm-up steps at the slowest row's measured cold progress (at batch 16, 1 token a step).
- T = 1 is plain AR (one token per forward), so where no window pays, auto runs AR. Width 1 is
  timed on the loop AR runs on (`_ar_rest`). Each real step, the whole loop iteration included, is
  folded into its width's cost (weight COST_UPDATE), AR's as well as the windows', so a probe that
  flattered either side is corrected; and since AR, once chosen, never measures a window, a window
  run for fewer than TRIAL_STEPS steps on this shape is still tried while it might win.
Near the image's end the window stays a probed width (rows past the end pad): a compiled step
builds one graph per width.

`window=<int>` fixes the width (no timing): the same samples, for measuring compression.
"""

from __future__ import annotations

import time
import weakref
from typing import Optional, Union

import torch

from ..checks import check_number
from .base import ForwardTally, Sampler, SamplerOutput, SettledGuards, cfg_batch, cfg_halves, compiled_step
from .logits import process_logits
from .speculative import (cfg_rows, covering_width, guidance, leading_accepts, over_codes, per_position,
                          same_positions, window_inputs)

# model -> {"costs": {key: {T: seconds}}, "hits": [..], "tries": [..], "books": {key: {"tried": {T: window
# steps run}, "gain": {T: [a mean row's extra tokens, steps]}, "slow": [the slowest row's extra tokens, a
# mean row's], "cold": [the slowest row's extra tokens in cold starts' warm-up steps, steps]}}} (dropped
# with the model)
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Per-depth acceptance before any observation, worth PRIOR_WEIGHT trials. The first window steps of
# an image verify drafts predicted from blind context and nearly all fail; with 4 pseudo-trials,
# four such misses at batch 4 voted the run to AR, and AR steps add no acceptance data, so it
# stayed there for the process although windows paid (docs/history/speculative.md, "Session 17").
PRIOR_ACCEPT, PRIOR_WEIGHT = 0.5, 32.0
COST_UPDATE = 0.3  # weight of each real step in its width's cost estimate
# A real step counts at most this many times its width's estimate: a step that builds a graph, or
# that the machine stalls, moves the estimate by at most COST_UPDATE * (STEP_CAP - 1).
STEP_CAP = 1.5
# A probed cost is a few bare steps and can be far off: at batch 4 (bf16, compiled) one probe timed a
# 4-token step at 3.93 ms that really took 2.85 ms (0.73x), and AR, once chosen, never measures a
# window again. So a window run for fewer than TRIAL_STEPS steps on a shape is still tried when it
# would win at PROBE_DOUBT times its estimated cost (a window far dearer is not). A trial the
# measured estimates end early is over too: otherwise every call would try it again.
TRIAL_STEPS, PROBE_DOUBT = 10, 0.7
# The first steps after a prefill run slow, whatever the sampler (default-c2i at batch 16, bf16
# compiled: 4.4, 4.3, 3.7, 3.4 ms, then 2.75 ms). AR, probed first right after the prefill, read
# 3.3 ms and lost to a window that did not pay; a window tried at an image's start reads dear. So
# the probe starts after PROBE_WARMUP untimed AR steps, and a call's first COLD_STEPS are not timed.
PROBE_WARMUP, COLD_STEPS = 8, 4
# Steps of one width in a row before their gain is booked: the first window holds blind drafts, the
# next ones drafts predicted from blind ones (in a trial at batch 4 a width-4 window gained a mean
# row 0.5 extra tokens a step there, against 0.6 once under way, and the slowest row far less); a
# window widened from 8 to 16 holds 8 blind drafts (3 such steps booked 0 extra tokens at batch 1,
# against 1.9 once under way, and kept `auto` at width 8, 6% slower than 16).
JACOBI_WARMUP = 3
# Windows started from AR (or at an image's start) pay those warm-up steps again: at batch 16
# (flextok-c2i, 32 tokens) a width-4 window moved the slowest row 1 token in each of its first 4
# steps, against 1.9 once under way, and the steady rate alone (within 1-3% of AR's) chose windows
# that ran 0.84x AR. So a cold start is charged JACOBI_WARMUP steps at the slowest row's measured
# cold progress (`book["cold"]`; prior: 1 token a step, worth COLD_PRIOR steps).
COLD_PRIOR = 3.0
# Prior of the slowest-row skew (1), worth this many extra tokens of a mean row. At batch 16 a width-2
# window gained the slowest row 1.24 tokens per step (default-c2i, bf16), far from a mean row's.
SKEW_PRIOR = 2.0
PRIOR_STEPS = 4.0  # weight, in real steps of a width, of the acceptance model's promise for it


def gumbel_noise(streams, batch: int, positions: int, vocab: int, device, scratch: int = 0) -> torch.Tensor:
    """[batch, positions + scratch, vocab] float32: Gumbel(0, 1) noise for the positions, sample i
    from stream i, position by position (position k always takes the k-th block of V numbers of
    its stream), then `scratch` rows of zeros. -log(-log(u)) in float64, one sample at a time in a
    cache-sized scratch buffer, rounded once into the result. This is most of what auto adds to
    an AR run: at batch 16, 1M uniforms; building it from [B, N, V] float64 temporaries took 2-3x
    as long as the draws themselves (fresh 8 MB buffers fault in page by page)."""
    out = torch.empty(batch, positions + scratch, vocab)
    out[:, positions:].zero_()
    if streams is None:  # the global generator, sample after sample (the same numbers as one draw)
        rows = (torch.rand(positions * vocab, dtype=torch.float64) for _ in range(batch))
    else:
        rows = streams.uniform_rows(positions * vocab)
    for sample, u in zip(out, rows):
        sample[:positions].view(-1).copy_(u.log_().neg_().log_().neg_())
    return out.to(device)


def position_noise(streams, model, batch: int, positions: int, device, scratch: int) -> torch.Tensor:
    """`gumbel_noise` for a generator's positions, then `scratch` positions of zeros: [B, positions +
    scratch, V], or [B, positions + scratch, k, V] with k codes per position (code c of position p
    takes block p * k + c of its stream)."""
    k = model.tokens_per_position
    noise = gumbel_noise(streams, batch, positions * k, model.vocab_size, device, scratch=scratch * k)
    return noise.view(batch, positions + scratch, *code_axis(model), -1)


def model_state(model) -> dict:
    try:
        return _STATE.setdefault(model, {"costs": {}, "hits": [], "tries": [], "books": {}})
    except TypeError:  # not weak-referenceable: keep nothing across calls
        return {"costs": {}, "hits": [], "tries": [], "books": {}}


def expected_tokens(hits, tries, widest: int) -> list:
    """E[tokens per step] of a width-T window for T = 1..widest (index T-1), under the per-depth
    acceptance estimates: 1 + sum_{j<T} prod_{i<=j} a_i. Depth 1's prior is PRIOR_ACCEPT, each
    deeper depth's the estimate of the depth before (worth PRIOR_WEIGHT trials): drafts that far
    are only tested by windows that wide, and on these models a draft whose predecessors were
    right is right at least as often (default-c2i: 0.4 at depth 1, 0.6-0.7 deeper)."""
    out, total, run, rate = [1.0], 1.0, 1.0, PRIOR_ACCEPT
    for depth in range(1, widest):
        h = hits[depth - 1] if depth - 1 < len(hits) else 0.0
        t = tries[depth - 1] if depth - 1 < len(tries) else 0.0
        rate = (h + rate * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT)
        run *= rate
        total += run
        out.append(total)
    return out


class AutoSampler(Sampler):
    """AutoSampler(window="auto", max_window=32, repeats=3).

    window: "auto" (cost model, the width chosen per step) or a fixed width (1 = AR).
    max_window: the widest window the cost model may pick. repeats: timed steps per width."""

    name = "auto"
    aliases = ("gumbel",)
    multi_code = True  # k codes per position: each code has its own noise; a position is right when all its codes are
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
    def _step(window, model, seq, emitted, reach, noise, width: int, cache, cond_len: int, num_tokens: int, params):
        """Feed a window of `width`, emit the verified tokens, keep the rest as drafts. `window`: the
        model's `window_step` (looked up once per call, outside the loop). `reach` [B]: image indices
        below it have been predicted by some forward (later drafts are blind).
        Returns (emitted [B], m [B] tokens emitted, lengths [B] window rows in the image, reach,
        counts [2, width - 1]: drafts tested and drafts right per depth, predicted ones only)."""
        emitted, m, lengths, reach, counts = window(model, seq, emitted, reach, noise, width, cache, cond_len,
                                                    num_tokens, params)
        kept = cond_len + emitted - 1
        cache.rewind(cfg_halves(kept, params.uses_cfg))
        return emitted, m, lengths, reach, counts

    @staticmethod
    def _window(model, seq, emitted, reach, noise, width: int, cache, cond_len: int, num_tokens: int, params):
        """`_step` but the cache's rewind (whose check reads a value back, a graph break)."""
        lengths = (num_tokens - emitted).clamp(0, width)
        tokens, pos = window_inputs(seq, emitted, width, cond_len, num_tokens)
        both_tokens, both_pos = cfg_rows(tokens, pos, params.uses_cfg)
        guided = per_position(guidance(params, emitted, width, num_tokens), seq)
        logits = process_logits(model.decode(both_tokens, both_pos, cache), params, guided)
        index = emitted[:, None] + torch.arange(width, device=seq.device)
        rows = torch.arange(seq.shape[0], device=seq.device)[:, None]
        y = (logits + noise[rows, index.clamp(max=noise.shape[1] - 1)]).argmax(-1)
        has_draft = torch.arange(width - 1, device=seq.device) < (lengths - 1)[:, None]
        n = leading_accepts(same_positions(tokens[:, 1:], y[:, :-1]) & has_draft)
        m = torch.where(lengths > 0, n + 1, 0)
        # y[:, :n+1] are the emitted tokens (y_j == d_j for j < n), y[:, n+1:] the next drafts;
        # rows past the image (finished rows, the end of a short one) write scratch columns
        seq.scatter_(1, over_codes(index, seq), y)
        counts = acceptance_counts(n, lengths, width, reach - emitted)
        return emitted + m, m, lengths, torch.maximum(reach, emitted + width), counts

    @staticmethod
    def _ar_rest(model, seq, start: int, noise, cache, cond_len: int, num_tokens: int, params,
                 stop: Optional[int] = None) -> None:
        """Image indices start..stop-1 (default N-1) for every row, one forward each: the AR sampler's step
        (argen.samplers.ar.decode_one_token: one shared position, advanced in place) with the
        Gumbel rule in place of its draw. The same tokens as `_ar_step`."""
        input_pos = torch.tensor([cond_len + start - 1], device=seq.device)
        scheduled = params.uses_cfg and params.cfg_schedule != "constant"
        compiled = compiled_step(model, AutoSampler._ar_token)
        step = compiled or AutoSampler._ar_token
        with SettledGuards(compiled is not None) as settled:  # as the AR sampler's loop (`decode_n_tokens`)
            for k in range(start, num_tokens if stop is None else stop):
                x = cfg_halves(seq[:, k - 1:k], params.uses_cfg)
                if scheduled:  # the window path's float32 scale table, so the numbers are the same
                    guided = guidance(params, torch.full((1,), k, device=seq.device), 1, num_tokens)[:, 0]
                else:
                    guided = params.guided_at(k)
                settled.before_step(guided)
                seq[:, k] = step(model, x, input_pos, cache, params, guided, noise[:, k])
                input_pos += 1

    @staticmethod
    def _ar_token(model, x, input_pos, cache, params, guided, noise):
        """One token per row [B] ([B, k] with k codes per position) under the Gumbel rule: the forward,
        CFG and the noisy argmax. `_ar_rest` runs it compiled with the model as one graph (as the AR
        sampler's `sample_step`: AR's draw and auto's would otherwise cost unlike amounts); `_ar_step`'s
        ragged rows run it as it is."""
        return (process_logits(model.decode(x, input_pos, cache)[:, -1], params, guided) + noise).argmax(-1)

    @staticmethod
    def _ar_step(model, seq, emitted, noise, cache, cond_len: int, num_tokens: int, params, shared=None):
        """Width 1 (plain AR under the Gumbel rule) without the window machinery: one token per
        active row, nothing to verify and nothing to rewind (the cache keeps what it wrote)."""
        rows = torch.arange(seq.shape[0], device=seq.device)
        active = emitted < num_tokens
        tokens = seq.gather(1, over_codes((emitted - 1)[:, None], seq))
        if shared is not None:  # every row at the same token: one position for all, as the AR sampler
            pos = torch.tensor([cond_len + shared - 1], device=seq.device)  # (the cache's one-kernel write)
        else:
            pos = (cond_len + emitted - 1).clamp(max=cond_len + num_tokens - 1)[:, None]
        tokens, pos = cfg_rows(tokens, pos, params.uses_cfg)  # a shared position [1] is not doubled
        guided = per_position(guidance(params, emitted, 1, num_tokens), seq)
        guided = guided if isinstance(guided, bool) else guided[:, 0]
        y = AutoSampler._ar_token(model, tokens, pos, cache, params, guided, noise[rows, emitted])
        seq[rows, emitted] = y  # finished rows write their scratch column N
        return emitted + active, active.long(), active.long()

    # ---- cost model ----------------------------------------------------------------------

    def _costs(self, model, cond_all, mask_all, cond_len, num_tokens, params, batch, state) -> tuple:
        """(costs {width: seconds per step}, book) for this shape: book["tried"] {width: window
        steps run}, book["gain"] {width: [a mean row's extra tokens, steps]}, book["slow"] (`skew`),
        book["cold"] [the slowest row's extra tokens in the warm-up steps of cold starts, their count]."""
        widths = [w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if w <= min(self.max_window, num_tokens)]
        device = model_device(model)
        key = (cond_all.shape[0], str(device), cond_len, num_tokens, params.uses_cfg, tuple(widths))
        if key not in state["costs"]:
            cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
            model.prefill(cond_all, cache, mask_all)
            window = window_step(model)
            extra = max(widths) + 1
            codes = code_axis(model)
            seq = torch.zeros(batch, num_tokens + extra, *codes, dtype=torch.long, device=device)
            noise = torch.zeros(batch, num_tokens + extra, *codes, model.vocab_size, device=device)
            start = torch.full((batch,), max(1, (num_tokens - max(widths)) // 2), dtype=torch.long, device=device)
            # emitted and reach as two tensors, as in a real step: the same tensor twice would make a
            # compiled window step build other graphs than the ones the loop then uses
            reach = start.clone()
            at = int(start[0])

            def timed(w: int) -> float:
                t0 = time.perf_counter()
                if w == 1:  # the path AR runs on (`_ar_rest`), one step
                    self._ar_rest(model, seq, at, noise, cache, cond_len, num_tokens, params, stop=at + 1)
                else:
                    self._step(window, model, seq, start, reach, noise, w, cache, cond_len, num_tokens, params)
                return time.perf_counter() - t0

            for _ in range(PROBE_WARMUP):  # untimed: the first steps after a prefill run slow
                timed(1)
            seconds = {}
            for w in widths:
                timed(w)  # warm-up (a compiled step builds this width's graph)
                seconds[w] = min(timed(w) for _ in range(self.repeats))
                if seconds[w] > seconds[1] * max(2.0, w / 2):
                    # it would need over max(2, w/2) tokens per step to pay (these models give
                    # under 3), and wider windows cost more still: stop timing them
                    break
            for w in seconds:  # one more round, interleaved: no width timed only early or late
                seconds[w] = min(seconds[w], timed(w))
            state["costs"][key] = seconds
        return state["costs"][key], state["books"].setdefault(key, {"tried": {}, "gain": {}, "slow": [0.0, 0.0],
                                                                      "cold": [0.0, 0]})

    def _choose(self, costs, state, low: int, num_tokens: int, book=None, previous: int = 1) -> int:
        """The width with the most expected progress of the slowest row (now at index `low`) per
        second. With a `book`: progress as measured on this shape (each width's mean row, and the
        slowest row's share, `skew`); a window that would start cold (`previous` is AR) is judged
        over the rest of the image with its warm-up steps at the measured cold progress; and a
        window run for fewer than TRIAL_STEPS steps on this shape takes the turn if it would win at
        PROBE_DOUBT x its estimated cost (the `previous` width first, so a trial runs its steps in
        a row: only steps in a run of one width are timed); a trial left, or cut short by the
        estimates, is over."""
        left = num_tokens - low
        promised = expected_tokens(state["hits"], state["tries"], max(costs))
        slow = 1.0 if book is None else skew(book)
        cold = None
        if book is not None and previous == 1:
            made, steps = book["cold"]
            cold = 1 + made / (steps + COLD_PRIOR)  # the slowest row's tokens per warm-up step
        values = {}
        for w, cost in costs.items():
            gained, steps = (0.0, 0) if book is None else book["gain"].get(w, (0.0, 0))
            extra = (gained + PRIOR_STEPS * (promised[min(w, left) - 1] - 1)) / (steps + PRIOR_STEPS)
            rate = min(1 + extra * slow, left)
            if cold is not None and w > 1:  # tokens per step over the rest of the image, warm-up first
                warmup = min(JACOBI_WARMUP, left / cold)
                rate = left / (warmup + (left - warmup * cold) / rate)
            values[w] = rate / cost
        best = max(values, key=values.get)
        if book is None:
            return best
        doubted = {w: v / PROBE_DOUBT for w, v in values.items()
                   if w not in (1, best) and v / PROBE_DOUBT > values[best] and book["tried"].get(w, 0) < TRIAL_STEPS}
        choice = (previous if previous in doubted else max(doubted, key=doubted.get)) if doubted else best
        if previous > 1 and choice != previous:
            # a trial the estimates end is over for this shape (tried again in every call, the
            # short trials added up to 10% of a batch-16 call)
            book["tried"][previous] = max(book["tried"].get(previous, 0), TRIAL_STEPS)
        return choice

    @staticmethod
    def _book_step(costs, book, width: int, seconds: Optional[float], slowest: int, made: Optional[tuple],
                   cold: bool = False) -> None:
        """Book one real window step: its time (the whole loop iteration) into its width's cost;
        the slowest row's gain `slowest` into the cold progress if it is a warm-up step of a cold
        start; from `made` (tokens emitted, rows that emitted) a mean row's extra tokens into its
        width's gain, and the slowest row's and a mean row's into the skew."""
        if seconds is not None:
            took = min(seconds, STEP_CAP * costs[width])
            costs[width] = (1 - COST_UPDATE) * costs[width] + COST_UPDATE * took
        if cold:
            book["cold"][0] += slowest - 1
            book["cold"][1] += 1
        if made is not None:
            tokens, rows = made
            gain = book["gain"].setdefault(width, [0.0, 0])
            gain[0] += tokens / rows - 1
            gain[1] += 1
            book["slow"][0] += slowest - 1
            book["slow"][1] += tokens / rows - 1

    # ---- loop ----------------------------------------------------------------------------

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
        batch, cond_len = cond.shape[0], model.condition_length(cond)
        state = model_state(model)
        costs = book = None
        if self.window == "auto":
            costs, book = self._costs(model, cond_all, mask_all, cond_len, num_tokens, params, batch, state)
        window = window_step(model)
        cap = self.max_window if self.window == "auto" else self.window
        cap = min(cap, num_tokens)
        cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
        first = process_logits(model.prefill(cond_all, cache, mask_all), params, params.guidance_at(0, num_tokens))
        device = first.device
        noise = position_noise(streams, model, batch, num_tokens, device, scratch=cap + 1)
        seq = torch.zeros(noise.shape[:-1], dtype=torch.long, device=device)
        seq[:, 0] = (first + noise[:, 0]).argmax(-1)
        drafted = False  # blind drafts are written before the first window step (an AR run needs none)
        emitted = torch.ones(batch, dtype=torch.long, device=device)
        # image indices below reach[b] have been predicted by some forward; a draft at or past it
        # is blind (argmax of the noise), so it says nothing about how well windows verify
        reach = emitted.clone()
        tally, widths = ForwardTally(batch, num_tokens, device, progress), []
        # (width, lowest index before, start or None, [tokens, rows] or None, cold warm-up step) of a step to book
        last = None
        same_width_in_row, cold_start = 0, False
        while True:
            top = time.perf_counter()
            low, high = (int(v) for v in emitted.aminmax())  # the step's host reads, once each
            if last is not None:
                width, before, began, made, cold = last
                self._book_step(costs, book, width, None if began is None else top - began, low - before,
                                None if made is None else made.tolist(), cold)
                last = None
            left = num_tokens - low
            if left <= 0:
                break
            widest = cap if costs is None else self._choose(costs, state, low, num_tokens, book,
                                                            widths[-1] if widths else 1)
            width = covering_width(left, widest)  # near the image's end a power of two (a probed width)
            if width == 1 and high == low:
                # every row at the same token and AR chosen: AR stays the choice to the end (the
                # rows stay in step, and a window's prospects only fall as the image runs out,
                # while AR steps add no acceptance data), so finish with the AR sampler's loop:
                # one shared position, no per-step choice or bookkeeping
                # AR's real steps are booked too, so neither side is judged by a lucky probe, but not
                # the stretch's first step: after windows it runs slow (1.4-1.6 ms against 0.85 at
                # batch 1, bf16, inductor's GEMMs), and the 1-3 step stretches at images' ends had raised
                # AR's estimate by 40% (1.4 ms against a real 0.97)
                booked = costs is not None and left > 1
                if booked:
                    self._ar_rest(model, seq, low, noise, cache, cond_len, num_tokens, params, stop=low + 1)
                second = time.perf_counter()
                self._ar_rest(model, seq, low + 1 if booked else low, noise, cache, cond_len, num_tokens, params)
                if booked:
                    took = min((time.perf_counter() - second) / (left - 1), STEP_CAP * costs[1])
                    costs[1] = (1 - COST_UPDATE) * costs[1] + COST_UPDATE * took
                tally.record_ar(left)
                widths.extend([1] * left)
                emitted = torch.full_like(emitted, num_tokens)
                continue
            if width == 1:  # rows out of step (after windows): AR with a position per row
                emitted, m, lengths = self._ar_step(model, seq, emitted, noise, cache, cond_len, num_tokens,
                                                    params, low if high == low else None)
            else:
                if not drafted:  # no window step yet, so no row has a token at or past `high`
                    seq[:, high:] = noise[:, high:].argmax(-1)  # one uniform token per position
                    drafted = True
                emitted, m, lengths, reach, counts = self._step(window, model, seq, emitted, reach, noise, width,
                                                                cache, cond_len, num_tokens, params)
                self._observe(state, counts)
            active = lengths > 0
            tally.record(m, active, emitted.min)
            same_width_in_row = same_width_in_row + 1 if widths and widths[-1] == width else 1
            if same_width_in_row == 1:  # a run of windows that starts from AR, or at the image's start
                cold_start = width > 1 and (not widths or widths[-1] == 1)
            if costs is not None and width > 1:
                book["tried"][width] = book["tried"].get(width, 0) + 1
                # Booked: the step's time (to the next iteration's start) if it follows a step of
                # its width (the first after a change may build a graph) past the call's cold
                # first steps; what it gained the rows, if it is not among the first steps of its
                # width (its drafts blind, or predicted from blind ones), nor cut short by the
                # image's end. Out-of-step AR steps are not booked: AR's cost is that of the
                # shared-position loop above, which is what it costs at a choice.
                timed = len(widths) >= max(COLD_STEPS, 1) and widths[-1] == width
                warm = same_width_in_row > JACOBI_WARMUP and left >= width
                cold = cold_start and same_width_in_row <= JACOBI_WARMUP
                made = torch.stack([m.sum(), active.sum()]) if warm else None
                last = (width, low, top if timed else None, made, cold) if timed or warm or cold else None
            widths.append(width)
        self.last_widths = widths
        return tally.output(seq[:, :num_tokens].flatten(1).clone())  # position-major codes

    @staticmethod
    def _observe(state, counts) -> None:
        """Add a step's `acceptance_counts` to the model's per-depth tries and hits."""
        t, h = counts.tolist()
        hits, tries = state["hits"], state["tries"]
        while len(tries) < len(t):
            tries.append(0.0)
            hits.append(0.0)
        for j in range(len(t)):
            tries[j] += t[j]
            hits[j] += h[j]


def acceptance_counts(n, lengths, width: int, informed) -> torch.Tensor:
    """[2, width - 1]: per depth j, the drafts tested and the drafts right in a step that accepted
    n [B] of its lengths [B] - 1 drafts. Depth j's draft was tested when the j-1 before it were right
    (and the row had it). Only predicted drafts count (depth j <= informed [B]): a blind draft is a
    uniform token, no evidence of how well this model's windows verify."""
    depths = torch.arange(1, width, device=n.device)
    tested = (n[:, None] >= depths - 1) & (depths <= lengths[:, None] - 1) & (depths <= informed[:, None])
    hit = tested & (n[:, None] >= depths)
    return torch.stack([tested.sum(0), hit.sum(0)])


def window_step(model):
    """`AutoSampler._window` for this model: when its decode is compiled, compiled as decode was
    (`compiled_step`), the forward and the Gumbel test as one graph. The test's two dozen small ops
    then cost little beside the forward: default-c2i, batch 1, a 16-token window, bf16, 3.22 ms a
    step against 3.7 ms with only the forward compiled (scratch A/B, same tokens)."""
    return compiled_step(model, AutoSampler._window) or AutoSampler._window


def skew(book) -> float:
    """The slowest row's extra tokens per window step over a mean row's, on one shape (1 at batch 1;
    a prior of 1 worth SKEW_PRIOR extra tokens)."""
    slowest, mean = book["slow"]
    return min(max((slowest + SKEW_PRIOR) / (mean + SKEW_PRIOR), 0.0), 1.0)


def code_axis(model) -> tuple:
    """The trailing shape of one position's tokens: () for one code, (k,) for k codes (token-shuffle)."""
    k = model.tokens_per_position
    return () if k == 1 else (k,)


def model_device(model) -> torch.device:
    emb = model.token_embeddings() if hasattr(model, "token_embeddings") else None
    return emb.device if emb is not None else torch.device("cpu")
