"""FID / IS / precision-recall / class accuracy: a thin wrapper over `argen eval fid`.

    python scripts/eval_fid.py --samples runs/c2i-ar --ref fashion-mnist:test
    python scripts/eval_fid.py --model default-c2i --sampler ar --num-samples 10000 --out runs/c2i-ar
    python scripts/eval_fid.py --samples samples.npz --extractor inception --inception-weights W.pth --ref REF.npz
"""

import sys

from argen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["eval", "fid", *sys.argv[1:]]))
