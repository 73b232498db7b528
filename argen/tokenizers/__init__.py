"""Image tokenizers behind one interface (`ImageTokenizer`). Never a top-level `tokenizers`
package: that name belongs to Hugging Face tokenizers, which transformers imports."""

from .base import ImageTokenizer
from .flextok import FlexTokTokenizer
from .titok import TiTokTokenizer
from .vq import VQTokenizer

__all__ = ["FlexTokTokenizer", "ImageTokenizer", "TiTokTokenizer", "VQTokenizer"]
