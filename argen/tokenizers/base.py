"""The tokenizer contract: images <-> integer codes, 2D (VQ) or 1D (TiTok, FlexTok).

Everything outside `argen/tokenizers` uses only these members:

    encode(images [B, C, H, W] in [-1, 1]) -> codes [B, n] int64 (2D grids in raster order)
    decode(codes [B, n], *, seeds=None)     -> images [B, C, H, W] in about [-1, 1]; a tokenizer
                                               with a random decoder draws image i's noise from
                                               seeds[i] only, so decoding is deterministic per image
    num_tokens                              n, the (maximum) number of codes per image
    vocab_size                              size of the code vocabulary
    grid                                    (h, w) when codes tile a 2D grid, None for 1D
    codebook_embeddings()                   [vocab_size, D] code vectors, or None
    image_size, image_channels              what decode produces
    accepts_prefixes                        True when decode takes any prefix codes[:, :k], 1 <= k <= n,
                                            and makes a whole image of it (FlexTok); then the pipeline
                                            may sample only the first k positions (`--num-tokens`)
    set_decoding(**settings)                change this instance's decoding defaults, e.g. a flow
                                            decoder's steps=, guidance_scale=, guidance_start=
                                            (FlexTok); a one-pass decoder refuses in one line
    decoding_settings                       the settings decode depends on beyond the weights (flow
                                            steps, guidance), {} for a one-pass decoder; sample
                                            folders and bench JSONs record them

Pixel ranges are converted at this boundary: a tokenizer working on [0, 1] pixels (TiTok)
converts inside encode/decode, so the rest of argen sees [-1, 1] only. A tokenizer saved with
`save_pretrained` is found again by its class name (`argen.registry`).
"""

from __future__ import annotations

import abc
from typing import Optional, Sequence

import torch

from ..errors import ArgenError


class ImageTokenizer(abc.ABC):
    #: whether `decode` takes a prefix codes[:, :k] of the sequence (ordered 1D tokens such as FlexTok's)
    accepts_prefixes: bool = False

    @property
    @abc.abstractmethod
    def num_tokens(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def grid(self) -> Optional[tuple]:
        return None

    @property
    @abc.abstractmethod
    def image_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def image_channels(self) -> int: ...

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor, *, seeds: Optional[Sequence[int]] = None) -> torch.Tensor: ...

    def codebook_embeddings(self) -> Optional[torch.Tensor]:
        return None

    def set_decoding(self, **settings) -> "ImageTokenizer":
        """A one-pass decoder has no decoding settings: any one given (not None) is a one-line error.
        A tokenizer with settings overrides this with its own keywords."""
        if any(value is not None for value in settings.values()):
            raise ArgenError(f"{type(self).__name__} decodes in one pass: flow steps and decoder guidance apply "
                             "to tokenizers with a flow decoder (FlexTok)")
        return self

    @property
    def decoding_settings(self) -> dict:
        return {}

    def compile_decoder(self, mode: str = "default") -> "ImageTokenizer":
        """Compile the decoder's network for the pipeline's `--compile` (mode: `COMPILE_MODES`).
        Optional, and worth it only where decoding is a large share of a run: compiled products round apart
        from eager ones, so the images move by float rounding (tokens never do). VQ and TiTok keep this
        default, which does nothing, and `--compile` leaves their images exactly eager's: their decodes are
        3-7% (default-c2i) and 7-21% (titok-c2i) of a run at batch 1-16 (docs/history/flextok.md, session 23), and
        their convolutions, pinned to oneDNN's kernel (`argen.tokenizers.layers`), do not trace as written."""
        return self

    def check_codes(self, codes: torch.Tensor, max_tokens: Optional[int] = None) -> torch.Tensor:
        """codes as int64 [B, n] with 1 <= n <= max_tokens (default num_tokens) and ids in the
        vocabulary, or a one-line error."""
        limit = self.num_tokens if max_tokens is None else max_tokens
        if codes.dim() != 2 or not 1 <= codes.shape[1] <= limit:
            raise ArgenError(f"codes must be [B, n <= {limit}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ArgenError(f"code id out of range: valid ids are 0..{self.vocab_size - 1}")
        return codes.long()


class ImageShapeFromConfig:
    """`image_size` and `image_channels` read from a diffusers config holding `image_size` and
    `in_channels` (every built-in tokenizer's config does)."""

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def image_channels(self) -> int:
        return self.config.in_channels
