"""What every sampler shares: the call signature, the result type, CFG batch building and the
registry of samplers by name.

A sampler turns a condition into generator tokens by calling the generator only through its
contract (`argen.models.base.Generator`: `new_cache`, `prefill`, `decode`, `num_positions`,
`tokens_per_position`, `vocab_size`, `grid`, condition helpers). Callers (the pipeline,
evaluation, benchmarks) hold a `Sampler` and never need to know which one it is.

Adding a sampler is one file: subclass `Sampler` with a `name` (and optional `aliases` and
`option_aliases` for short spec keys such as `L=8`), implement `_sample`, and import the file
from `argen/samplers/__init__.py`; it registers itself when defined.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ArgenError
from .logits import SamplingParams
from .rng import GeneratorArg, RandomStreams, make_streams


def compiled_step(model, fn: Callable) -> Optional[Callable]:
    """A sampler's own step `fn` compiled as the model's `decode` was (the generator contract's
    optional `compile_step`), or None while decode runs eager. Cached per model and fn; a model
    compiled again (say in another mode) gets its steps compiled again, like its new decode."""
    compile_step = getattr(model, "compile_step", None)
    if compile_step is None:
        return None
    # kept on the model, as its compiled decode is: dynamo's compiled step refers to the model, so a
    # cache outside it (even weakly keyed) would keep every model it ever saw alive
    steps = vars(model).setdefault("_compiled_steps", {})
    cached = steps.get(fn)
    if cached is not None and cached[0] is model.decode:
        return cached[1]
    step = compile_step(fn)
    if step is not None:
        steps[fn] = (model.decode, step)
    return step


class SettledGuards:
    """Lets a sampling loop's compiled steps skip the dynamo guards they can only pass.

    Use one per loop (`with SettledGuards(compiled) as settled:`) and call `settled.before_step(guided)` before
    each step with the guidance it passes. A guided bool is a constant of the compiled graph; a scale (a float
    the eager draw reads, or a tensor input) is not. A step whose guided bool differs from the previous step's
    (or the loop's first step) checks every guard, so it picks or builds the right graph. The steps after it
    with the same bool run under `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, where dynamo checks
    only the guards that tell its graphs apart.

    This is safe because those steps pass the same objects with the same shapes. Only tensor values move, and
    the cache's span, which the graph takes as an unbacked size. So every other check would pass again. The
    guided flag is the one constant that changes midway: `cfg_interval` turns guidance off.

    Skipping the checks made default-c2i's compiled AR sampling 1.02-1.12x faster at batch 1 and 1.02x at 16
    (max-autotune, 1 thread; up to 1.25x while the host ran slow; docs/history/decode.md, "Session 31"),
    though the same check timed alone takes 17 us. The stance is held across steps, not set per step: entering and
    leaving it costs about 0.5 ms. Only for loops whose steps keep one shape: a loop that may need a new graph
    midway (a speculative sampler's changing window) keeps every check."""

    def __init__(self, compiled: bool):
        self.compiled, self.previous, self.stance = compiled, object(), None

    def __enter__(self) -> "SettledGuards":
        return self

    def __exit__(self, *exc) -> None:
        self._check_all()

    def before_step(self, guided=None) -> None:
        constants = guided if isinstance(guided, bool) else None
        if self.compiled and constants == self.previous:
            if self.stance is None:
                self.stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
                self.stance.__enter__()
        else:
            self._check_all()
        self.previous = constants

    def _check_all(self) -> None:
        if self.stance is not None:
            self.stance.__exit__(None, None, None)
            self.stance = None


@dataclass
class SamplerOutput:
    """tokens: [B, N] int64. num_forward_passes: model calls for the whole batch, prefill
    included (NFE). accepted_per_forward: tokens emitted per forward per sample, one entry per
    decode forward (1.0 throughout for plain AR). forwards_per_sample: [B], the forward pass
    after which each sample was complete (ragged speculative batches finish rows at different
    times; None means every row took num_forward_passes). draft_forward_passes: calls of a
    draft model for the whole batch, prefill included (0 for samplers without one); never part
    of num_forward_passes. draft_forwards_per_sample: [B], the draft-model forwards each sample
    needed (what it would cost alone; None without a draft model)."""

    tokens: torch.Tensor
    num_forward_passes: int
    accepted_per_forward: list = field(default_factory=list)
    forwards_per_sample: Optional[torch.Tensor] = None
    draft_forward_passes: int = 0
    draft_forwards_per_sample: Optional[torch.Tensor] = None

    def outside_inference_mode(self) -> "SamplerOutput":
        """A copy whose tensors are ordinary ones: an inference-mode tensor refuses in-place updates
        (and autograd) outside inference mode, which a caller of a sampler has every right to do."""
        def plain(t):
            return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t

        return replace(self, tokens=plain(self.tokens), forwards_per_sample=plain(self.forwards_per_sample),
                       draft_forwards_per_sample=plain(self.draft_forwards_per_sample))

    @property
    def nfe_per_sample(self) -> torch.Tensor:
        if self.forwards_per_sample is not None:
            return self.forwards_per_sample
        return torch.full((self.tokens.shape[0],), self.num_forward_passes)

    @property
    def mean_accepted_per_forward(self) -> float:
        values = self.accepted_per_forward
        return sum(values) / len(values) if values else 0.0


class ForwardTally:
    """The bookkeeping of a loop that emits a varying number of tokens per forward pass (every
    sampler but AR): each row's forwards (the prefill counts as one; a finished row stops
    counting), the mean tokens emitted per active row by each forward, and the progress bar.
    `output` turns it into the `SamplerOutput`."""

    def __init__(self, batch: int, num_tokens: int, device, progress: bool):
        self.forwards = torch.ones(batch, dtype=torch.long, device=device)
        self.accepted: list = []
        self.bar = tqdm(total=num_tokens, disable=not progress, desc="tokens", leave=False)

    def record(self, emitted: torch.Tensor, active: torch.Tensor, done: Callable[[], torch.Tensor]) -> None:
        """One forward: emitted [B] tokens per row, active [B] the rows it ran for; `done()`, the
        tokens finished by the slowest row, is read (a host sync) only when the bar shows."""
        self.forwards += active
        self.accepted.append(emitted.sum() / active.sum())
        if not self.bar.disable:
            self.bar.update(int(done()) - self.bar.n)

    def record_ar(self, steps: int) -> None:
        """`steps` one-token forwards of every row (an AR stretch)."""
        self.forwards += steps
        self.accepted.extend([torch.ones(())] * steps)

    def output(self, tokens: torch.Tensor) -> SamplerOutput:
        self.bar.close()
        return SamplerOutput(tokens=tokens, num_forward_passes=1 + len(self.accepted),
                             accepted_per_forward=torch.stack(self.accepted).tolist() if self.accepted else [],
                             forwards_per_sample=self.forwards.cpu())


def cfg_halves(x: torch.Tensor, uses_cfg: bool) -> torch.Tensor:
    """x for both CFG halves of a forward: twice along the batch when guidance is on (the conditional
    rows first, as `cfg_batch`), else x. Tokens, per-row positions, cache lengths and tree paths alike."""
    return torch.cat([x, x]) if uses_cfg else x


def cfg_batch(model, cond: torch.Tensor, cond_mask: Optional[torch.Tensor], params: SamplingParams):
    """[cond ; null(cond)] when guidance is on (conditional half first, as LlamaGen), else cond."""
    if not params.uses_cfg:
        return cond, cond_mask
    both = torch.cat([cond, model.null_condition(cond)])
    mask = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
    return both, mask


REGISTRY: Dict[str, type] = {}  # sampler name or alias -> class


class Sampler(abc.ABC):
    """Base class. Subclasses implement `_sample` and may take their own options in __init__.

    Class attributes: `name` (registered when a concrete subclass is defined), `aliases`,
    `option_aliases` (short option names for specs), `multi_code` (whether it can sample
    generators with several codes per position), `uses_draft` (whether it samples with a draft
    model from `prepare(draft=...)`)."""

    name: str = ""
    aliases: tuple = ()
    option_aliases: Dict[str, str] = {}
    multi_code: bool = False
    uses_draft: bool = False  # takes a draft model through prepare(draft=...); its samples depend on it

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") and not inspect.isabstract(cls):
            for key in (cls.name, *cls.__dict__.get("aliases", ())):
                REGISTRY[key] = cls

    def prepare(self, **components) -> "Sampler":
        """Receive what the sampler needs beyond the generator, before sampling: the pipeline
        passes `tokenizer=` (and `refiner=`); a draft-model sampler would take `draft=`. Unused
        components are ignored. Returns self."""
        return self

    @property
    def needs_grid(self) -> bool:
        """Whether this sampler (as configured) needs a 2D position grid."""
        return False

    def check_model(self, model) -> None:
        """A one-line error when this sampler cannot run on `model`."""
        if model.tokens_per_position > 1 and not self.multi_code:
            raise ArgenError(f"sampler {self.name!r} does not support generators with several codes per position "
                             f"(this one emits {model.tokens_per_position})")
        if self.needs_grid and model.grid is None:
            raise ArgenError(f"{self!r} needs a 2D token grid; this generator's positions are 1D")

    def __call__(self, model, cond: torch.Tensor, *, params: SamplingParams = SamplingParams(),
                 cond_mask: Optional[torch.Tensor] = None, num_tokens: Optional[int] = None,
                 seeds: Optional[Sequence[int]] = None, generator: GeneratorArg = None,
                 progress: bool = False) -> SamplerOutput:
        """Sample `num_tokens` positions (default: all of the model's) for each condition.

        cond: class ids [B] or caption features [B, T, D] with `cond_mask` [B, T].
        seeds / generator: per-sample random streams (same sample whatever the batch size);
        neither: the global RNG, drawn exactly as official LlamaGen does.
        """
        limit = model.num_positions
        num_tokens = limit if num_tokens is None else int(num_tokens)
        if not 1 <= num_tokens <= limit:
            raise ArgenError(f"num_tokens must be in 1..{limit}, got {num_tokens}")
        self.check_model(model)
        if params.uses_cfg and not model.supports_cfg:
            raise ArgenError("cfg_scale > 1 needs a model trained with condition dropout (it has no null condition)")
        model.check_condition(cond, cond_mask)
        streams = make_streams(cond.shape[0], seeds, generator)
        # Inference mode, not no_grad: tensors made in it keep no version counter and no view
        # tracking, which is a dispatcher layer less on each of the ~1,000 small ops of a decode step.
        # Eager AR sampling of default-c2i at batch 1 ran 1.03-1.11x faster (docs/history/decode.md,
        # "Session 37"); the same floats, so the same samples.
        with torch.inference_mode():
            out = self._sample(model, cond, cond_mask, num_tokens, params, streams, progress)
        return out.outside_inference_mode()

    @abc.abstractmethod
    def _sample(self, model, cond, cond_mask, num_tokens: int, params: SamplingParams,
                streams: Optional[RandomStreams], progress: bool) -> SamplerOutput:
        ...
