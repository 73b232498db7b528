"""Sampler comparison (NFE, step compression, wall-clock, FID): a thin wrapper over `argen bench samplers`.

    python scripts/compare_samplers.py ar sjd mcsjd gsd:G=3 gsd:G=10 --model default-c2i --batch-sizes 1,16 \
        --fid 1000 --json runs/samplers.json --plot runs/samplers.png
"""

import sys

from argen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "samplers", *sys.argv[1:]]))
