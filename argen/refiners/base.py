"""The refiner contract: an optional stage between the generator and the tokenizer.

A refiner turns what a generator sampled into the codes a tokenizer decodes, e.g. coarse-to-fine
prediction: the generator samples coarse labels (cluster ids), the refiner predicts every fine
code in one pass. The pipeline checks the chain of vocabularies and lengths:
generator (vocab_size, num_codes) -> refiner (in_vocab_size, num_tokens -> vocab_size) ->
tokenizer (vocab_size, num_tokens).

    refine(tokens [B, n], cond, cond_mask, *, seeds) -> codes [B, n]   deterministic per image seed
    compile_pass(mode)         optional: torch.compile its network (the pipeline's --compile)
"""

from __future__ import annotations

import abc
from typing import Optional, Sequence

import torch


class Refiner(abc.ABC):
    @property
    @abc.abstractmethod
    def in_vocab_size(self) -> int:
        """Vocabulary of the tokens it reads (the generator's)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Vocabulary of the codes it writes (the tokenizer's)."""

    @property
    @abc.abstractmethod
    def num_tokens(self) -> int:
        """Codes per image, read and written."""

    def input_embeddings(self) -> Optional[torch.Tensor]:
        """[in_vocab_size, D] vectors of the tokens it reads, or None. Samplers that compare
        generator tokens (GSD's embeddings="codebook") take these instead of the tokenizer's
        codebook, which describes the refiner's output vocabulary, not the generator's."""
        return None

    def compile_pass(self, mode: str = "default") -> "Refiner":
        """Compile the refiner's network for the pipeline's `--compile` (mode: `COMPILE_MODES`).
        Optional: a refiner with nothing worth compiling keeps this default, which does nothing."""
        return self

    @abc.abstractmethod
    def refine(self, tokens: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None, *,
               seeds: Optional[Sequence[int]] = None) -> torch.Tensor: ...
