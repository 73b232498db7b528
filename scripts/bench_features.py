"""Feature-extraction throughput of an evaluation extractor: a thin wrapper over `argen bench features`.

    python scripts/bench_features.py --extractor inception --inception-weights weights-inception-2015-12-05-6726825d.pth
"""

import sys

from argen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "features", *sys.argv[1:]]))
