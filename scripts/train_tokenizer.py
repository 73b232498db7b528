#!/usr/bin/env python
"""Train a VQ tokenizer on Fashion-MNIST: same options as `argen train tokenizer`.

    python scripts/train_tokenizer.py --out runs/vq --steps 1500 --resume
    accelerate launch scripts/train_tokenizer.py --out runs/vq --steps 1500   # several processes
"""

import sys
from pathlib import Path

try:
    import argen  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from argen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "tokenizer", *sys.argv[1:]]))
