"""The interface every image tokenizer implements, 2D (VQ) or 1D (TiTok, FlexTok)."""

from __future__ import annotations

import abc

import torch


class ImageTokenizer(abc.ABC):
    """images [B, C, H, W] in [-1, 1] <-> integer codes.

    `code_shape` is (h, w) for a 2D grid (codes [B, h, w], raster order when flattened) or (N,)
    for a 1D sequence (codes [B, N]). Generators see the flattened codes; `vocab_size` is their
    vocabulary and `codebook_embeddings()` the vectors behind each id (speculative samplers use
    them to group similar tokens).
    """

    @property
    @abc.abstractmethod
    def code_shape(self) -> tuple: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def image_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def image_channels(self) -> int: ...

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def codebook_embeddings(self) -> torch.Tensor: ...

    @property
    def num_tokens(self) -> int:
        n = 1
        for s in self.code_shape:
            n *= s
        return n

    def decode_flat(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode generator output [B, num_tokens] (flattened codes)."""
        return self.decode(tokens.reshape(tokens.shape[0], *self.code_shape))
