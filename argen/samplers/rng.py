"""Random streams for sampling.

With per-sample streams, row i of a batch draws only from its own generator, in an order that
depends only on its own trajectory, so a sample is the same whatever the batch size (and
whatever process it runs in). Without them, sampling uses the global RNG through one
`torch.multinomial(probs, 1)` per step: exactly the official LlamaGen call sequence, so seeded
official traces reproduce.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..checks import check_seed
from ..errors import ArgenError

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


class RandomStreams:
    """One CPU `torch.Generator` per sample. Draws are made on the CPU, so the numbers do not
    depend on the device the model runs on, then moved to it."""

    # Uniforms are drawn ahead in blocks of this many per stream: one Python loop over the
    # generators per block instead of per call (a speculative step asks for ~4L numbers per
    # row). A CPU generator's float64 stream is the same however the draws are split (checked by
    # tests/test_samplers.py), so the numbers, and every sample, are unchanged; the generators
    # are left further along than the numbers used, so a stream owns its generators.
    BLOCK = 512

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)
        self._buffer = torch.empty(len(self.generators), 0, dtype=torch.float64)
        self._offset = 0

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> "RandomStreams":
        return cls([torch.Generator().manual_seed(int(s)) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, rows: Sequence[int]) -> "RandomStreams":
        """The streams of `rows`, continuing exactly where these left off (buffered numbers included)."""
        out = RandomStreams([self.generators[i] for i in rows])
        out._buffer = self._buffer[list(rows), self._offset:].clone()
        return out

    def uniform_rows(self, n: int):
        """Yield, stream by stream, its next `n` uniforms (float64 [n]): the numbers `uniform(n)`
        would give row i, without a [B, n] block. Each yielded tensor is one reused scratch buffer
        (use it, in place if you like, before asking for the next): a Gumbel sampler draws N*V
        numbers per row (8 MB at batch 16), and fresh buffers that size cost more in page faults
        than the draws themselves."""
        take = min(self._buffer.shape[1] - self._offset, n)  # buffered numbers come first
        buffered = self._buffer[:, self._offset:self._offset + take]
        self._offset += take
        scratch = torch.empty(n, dtype=torch.float64)
        for row, g in enumerate(self.generators):
            scratch[:take] = buffered[row]
            if n > take:
                torch.rand(n - take, generator=g, dtype=torch.float64, out=scratch[take:])
            yield scratch

    def uniform(self, *shape: int, device=None) -> torch.Tensor:
        """[B, *shape] uniforms in [0, 1), row i from generator i."""
        n = 1
        for size in shape:
            n *= int(size)
        if self._offset + n > self._buffer.shape[1]:
            fresh = max(self.BLOCK, n)
            left = self._buffer.shape[1] - self._offset
            # each generator writes its numbers straight into its row after the unused ones (no
            # stack + cat: a Gumbel sampler draws N*V numbers per row at once, megabytes)
            buffer = torch.empty(len(self.generators), left + fresh, dtype=torch.float64)
            buffer[:, :left] = self._buffer[:, self._offset:]
            for row, g in zip(buffer, self.generators):
                torch.rand(fresh, generator=g, dtype=torch.float64, out=row[left:])
            self._buffer, self._offset = buffer, 0
        out = self._buffer[:, self._offset:self._offset + n]
        self._offset += n
        return out.reshape(len(self.generators), *shape).to(device)


def make_streams(batch_size: int, seeds: Optional[Sequence[int]] = None,
                 generator: GeneratorArg = None) -> Optional[RandomStreams]:
    """Per-sample streams from `seeds` (one int per sample) or `generator` (a list, one per
    sample). A single generator gives every row a seed drawn from it, in order: reproducible,
    but sample i then depends on its index, not on the batch it sits in."""
    if seeds is not None and generator is not None:
        raise ArgenError("give seeds or generator, not both")
    if seeds is not None:
        if len(seeds) != batch_size:
            raise ArgenError(f"got {len(seeds)} seeds for a batch of {batch_size}")
        # checked: a CPU generator keeps only 32 bits, so a larger seed would repeat a smaller one
        return RandomStreams.from_seeds([check_seed("seed", s) for s in seeds])
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        drawn = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
        return RandomStreams.from_seeds(drawn)
    if len(generator) != batch_size:
        raise ArgenError(f"got {len(generator)} generators for a batch of {batch_size}")
    return RandomStreams(generator)


def sample_from_probs(probs: torch.Tensor, streams: Optional[RandomStreams]) -> torch.Tensor:
    """Draw one token per distribution: probs [B, V] -> [B], or [B, k, V] -> [B, k].

    Global-RNG mode calls `torch.multinomial` once (the official call for [B, V]). Stream mode
    inverts the CDF at one uniform per distribution (row i's from stream i): right-sided search
    so zero-probability tokens are never picked.
    """
    if streams is None:
        return torch.multinomial(probs.flatten(0, -2), num_samples=1).view(probs.shape[:-1])
    return sample_rows(probs, streams.uniform(*probs.shape[1:-1], device=probs.device))


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per distribution: probs [..., V] (unnormalised is fine), uniforms u [...].

    Inverse CDF in float64 with a right-sided search, so zero-mass tokens are never drawn."""
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1).contiguous()
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
