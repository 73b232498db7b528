"""The generator contract: everything the rest of argen may ask of an image generator.

Samplers, the pipeline, evaluation, benchmarks and training talk to a generator only through
the members below; nothing outside `argen/models` reads a model's config or its modules. A new
generator (token-shuffle, a coarse-label GPT, ...) subclasses `Generator`, implements them, and
registers itself (`argen.registry.register`) so pipelines saved with it load by class name.

Structure
    num_positions        positions generated after the condition prefix (one forward each in AR)
    tokens_per_position  k: codes emitted per position (1 for GPT; s*s for token-shuffle)
    vocab_size           size of each code's vocabulary
    grid                 (rows, cols) of positions when they tile a 2D image, None for 1D
    condition_kind       "class" (cond = int ids [B]) or "text" (cond = features [B, T, D] + mask [B, T])
    num_classes          class-conditional generators: ids 0..num_classes-1

Conditions
    check_condition(cond, cond_mask)   a one-line ArgenError for a condition it cannot take
    supports_cfg                       whether a null condition exists (trained with condition dropout)
    null_condition(cond)               the unconditional counterpart, same shape as cond
    condition_length(cond)             sequence positions the condition occupies

Cached forward (what samplers call; the cache belongs to the sampling call)
    cache = new_cache(batch_size, max_len)
    logits = prefill(cond, cache, cond_mask)   [B, V] (k = 1) or [B, k, V]: the first position
                                               (after `prepare_for_sampling`, a class id's prefix
                                               may come from memory: the same bits, no forward)
    logits = decode(tokens, input_pos, cache)  tokens [B, T] (k = 1) or [B, T, k] at sequence
                                               positions input_pos ([T] or [B, T]) ->
                                               [B, T, V] or [B, T, k, V]; several positions per
                                               call verify a speculative window
    cache.rewind(lengths)                      drop rejected speculative positions

Codes
    tokens_to_codes(tokens)   sampler output [B, num_positions * k] (position-major) -> the
                              codes [B, n] a tokenizer or refiner reads (identity for GPT)
    codes_to_tokens(codes)    the inverse, for training and scoring
    token_embeddings()        [vocab_size, D] input embeddings (samplers that compare codes), or None

Training
    loss(codes, cond, cond_mask)   mean cross-entropy over every code (teacher forcing)

Weight formats (optional; samplers never see them)
    weight_formats            formats the generator can store its decode-step weights in
    weight_format             the current one ("fp32" unless changed)
    set_weight_format(fmt)    convert in place for inference (GPT: "fp32-packed", "bf16", weight-only
                              "int8"); every generator takes "auto" (its fastest format that keeps
                              the fp32 numbers to rounding; fp32 when it has no other)

Compiled decode (optional)
    compile_step(fn)          `fn` torch.compiled as `decode` was (the same options and inductor
                              settings), or None while `decode` runs eager; a sampler compiles its
                              own step around `decode` with it (auto). A step whose arguments are
                              named `input_pos` and `cache` attends only over the slots its positions
                              reach; without `input_pos`, over the whole cache
"""

from __future__ import annotations

import abc
import functools
import inspect
from typing import Callable, Optional

import torch

from ..errors import ArgenError

# modes of a compiled decode (GPT.compile_decode). The max-autotune modes freeze the weights into each
# graph and run every product through one GEMM family, the same at every batch shape (MAX_AUTOTUNE_GEMMS)
COMPILE_MODES = ("default", "max-autotune", "max-autotune-cpp")
# inductor's `max_autotune_gemm_backends` per mode. One family each, never a timed choice between them: a
# family's kernels sum a row in one order at every row count, but inductor's C++ kernels and ATen's sum
# in different orders, so a choice per product shape (inductor's own "CPP,ATEN") gives a seed a different
# image at batch 1 than at 16 (docs/architecture.md, "Compiled steps"). ATen's family here is oneDNN's packed
# GEMM in every float format (fp32 moved off MKL's by argen.models.onednn_products)
MAX_AUTOTUNE_GEMMS = {"max-autotune": "ATEN", "max-autotune-cpp": "CPP"}


class Generator(abc.ABC):
    """Mixin declaring the generator contract (see the module docstring). Concrete generators
    are also `torch.nn.Module`s, so `.to()`, `.eval()`, `.parameters()` work as usual."""

    tokens_per_position: int = 1
    # may a prefill copy remembered per-class prefixes (the same bits) instead of running the forward? Off on
    # a bare model, so hooks and traces see every forward; `prepare_for_sampling` turns it on (GPT: `prefill`)
    remembers_class_prefixes: bool = False
    # (torch.compile options, inductor weight freezing) once `decode` is compiled; see "Compiled decode"
    compiled_with: Optional[tuple] = None

    def compile_step(self, fn: Callable) -> Optional[Callable]:
        """`fn` compiled as `decode` was, or None while `decode` runs eager (see "Compiled decode")."""
        if self.compiled_with is None:
            return None
        options, freeze = self.compiled_with
        compiled = torch.compile(fn, **options)
        return with_attention_span(fn, with_frozen_weights(compiled) if freeze else compiled)

    def prepare_for_sampling(self):
        """What `ARPipeline` does to its generator before sampling: the choices that keep every sample's bits
        but would surprise a bare model's user (no forward for a remembered class prefix, weights in another
        memory layout). Returns self."""
        self.remembers_class_prefixes = True
        return self

    # ---- structure ------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def num_positions(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def grid(self) -> Optional[tuple]: ...

    @property
    @abc.abstractmethod
    def condition_kind(self) -> str: ...

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def num_codes(self) -> int:
        """Codes per image: num_positions * tokens_per_position."""
        return self.num_positions * self.tokens_per_position

    # ---- conditions -----------------------------------------------------------------------

    @abc.abstractmethod
    def check_condition(self, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None) -> None: ...

    @property
    @abc.abstractmethod
    def supports_cfg(self) -> bool: ...

    @abc.abstractmethod
    def null_condition(self, cond: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def condition_length(self, cond: torch.Tensor) -> int: ...

    # ---- cached forward -------------------------------------------------------------------

    @abc.abstractmethod
    def new_cache(self, batch_size: int, max_len: Optional[int] = None): ...

    @abc.abstractmethod
    def prefill(self, cond: torch.Tensor, cache, cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache) -> torch.Tensor: ...

    # ---- codes ----------------------------------------------------------------------------

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def token_embeddings(self) -> Optional[torch.Tensor]:
        return None

    # ---- training -------------------------------------------------------------------------

    @abc.abstractmethod
    def loss(self, codes: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    # ---- weight formats (optional) ---------------------------------------------------------

    weight_formats: tuple = ("fp32",)

    @property
    def weight_format(self) -> str:
        return "fp32"

    def set_weight_format(self, fmt: str):
        """Store the decode-step weights as `fmt`; a generator without other formats keeps fp32."""
        if fmt not in self.weight_formats and fmt != "auto":
            raise ArgenError(f"{type(self).__name__} supports weight formats {', '.join(self.weight_formats)}, not {fmt!r}")
        return self

    # ---- helpers for callers --------------------------------------------------------------

    @property
    def is_text_conditional(self) -> bool:
        return self.condition_kind == "text"

    def check_codes(self, codes: torch.Tensor) -> None:
        """A one-line error for codes of the wrong length or outside the vocabulary."""
        if codes.dim() != 2 or codes.shape[1] != self.num_codes:
            raise ArgenError(f"expected codes [B, {self.num_codes}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ArgenError(f"code out of range: valid codes are 0..{self.vocab_size - 1}")


def with_attention_span(fn: Callable, compiled: Callable) -> Callable:
    """`compiled` (fn, torch.compile'd) called after the span of its KV cache was set on the host.

    A graph cannot read a position back to size its loops, so without this it attends over the cache's
    whole static length at every step. fn names its cache `cache` and, when it has them, its positions
    `input_pos` (a sampler's step that computes positions inside attends over the whole cache).
    Inside another graph (a sampler's compiled step calling the compiled `decode`) the outer call
    has set it."""
    names = list(inspect.signature(fn).parameters)
    if "cache" not in names:
        return compiled
    at_cache = names.index("cache")
    at_pos = names.index("input_pos") if "input_pos" in names else None

    def argument(args, kwargs, at, name):
        return args[at] if at < len(args) else kwargs[name]

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            input_pos = None if at_pos is None else argument(args, kwargs, at_pos, "input_pos")
            argument(args, kwargs, at_cache, "cache").attend_upto(input_pos, for_graph=True)
        return compiled(*args, **kwargs)

    return call


def with_frozen_weights(compiled: Callable) -> Callable:
    """`compiled` (a torch.compile'd function) called with inductor's weight freezing on. Frozen, the
    weights are constants of each graph (compiled at the first call of each shape, so the setting must
    hold at every call), and inductor can then choose its own C++ GEMM kernels: at batch 1 a bf16 step
    of default-c2i takes 0.76 ms against 1.61 ms through oneDNN's per-call GEMMs (docs/history/decode.md,
    session 19). torch.compile's `options` do not reach this setting (measured: no effect)."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


def weights_key(tensors) -> tuple:
    """What changes when a weight is loaded, stepped, cast or moved: the key of a tensor derived from them.
    Weights made in inference mode keep no version counter (they can then change in place only inside it)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)
