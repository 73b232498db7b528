"""Decode speed vs memory roofline: a thin wrapper over `argen bench decode`.

    python scripts/bench_decode.py --size GPT-B --batch-sizes 1,8 --variants fp32,bf16
"""

import sys

from argen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
