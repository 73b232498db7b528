"""Generate evaluation samples (resumable; multi-process with accelerate): a thin wrapper over
`argen eval sample`.

    python scripts/sample_fid.py --model default-c2i --sampler ar --num-samples 10000 --out runs/c2i-ar --npz
    accelerate launch --cpu --num_processes 2 scripts/sample_fid.py --model default-c2i --num-samples 10000 --out runs/x
"""

import sys

from argen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["eval", "sample", *sys.argv[1:]]))
