#!/usr/bin/env python
"""Train a c2i or t2i GPT on VQ codes of Fashion-MNIST: same options as `argen train gpt`.

    python scripts/train_gpt.py --model-type c2i --vq default-vq --out runs/c2i --steps 1200 --resume
    accelerate launch scripts/train_gpt.py --model-type t2i --vq default-vq --out runs/t2i --steps 1000
"""

import sys
from pathlib import Path

try:
    import argen  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from argen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "gpt", *sys.argv[1:]]))
