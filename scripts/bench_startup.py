"""Wall time of whole `argen` commands, today's tree against an earlier one, runs interleaved.

What a user of `argen generate` waits for is mostly start-up (imports, loading) and exit, not sampling, so this
times the whole process: each round runs every command once with each tree, the order rotating from round to
round (`argen.bench.decode.interleave`), and the table gives the median seconds of each and their ratio. The
earlier tree is a checkout, for example `git worktree add /tmp/argen-before <commit>`:

    python scripts/bench_startup.py --before /tmp/argen-before --rounds 7

Each command runs as `python -m argen ...` from its tree's root, so that tree's package is the one imported.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TODAY = Path(__file__).resolve().parents[1]
COMMANDS = [
    "generate --model default-c2i --class sneaker --out {out}/c2i.png",
    "generate 'a pair of sneakers' --model default-t2i --out {out}/t2i.png",
    "generate --model shuffle-c2i --class sneaker --num-images 1 --out {out}/shuffle.png",
]


def wall_seconds(tree: Path, command: str, out: Path) -> float:
    argv = [sys.executable, "-m", "argen", *shlex.split(command.format(out=out))]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{tree}: `argen {command}` failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="root of the earlier checkout")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--command", action="append", help="an argen command ({out} = a scratch folder); repeatable")
    args = p.parse_args()
    if not (args.before / "argen" / "__init__.py").exists():
        p.error(f"--before {args.before}: no argen/ package there")
    commands = args.command or COMMANDS
    trees = {"before": args.before.resolve(), "today": TODAY}
    from argen.bench.decode import interleave  # after the argument checks: it imports torch

    with tempfile.TemporaryDirectory() as scratch:
        tasks = {(name, command): (lambda tree=tree, command=command: [wall_seconds(tree, command, Path(scratch))])
                 for command in commands for name, tree in trees.items()}
        times = interleave(tasks, args.rounds)
    print("| command | before, s | today, s | today's speed-up |")
    print("|---|---|---|---|")
    for command in commands:
        before, today = (statistics.median(times[name, command]) for name in trees)
        spread = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"  # noqa: E731
        print(f"| `argen {command.format(out='OUT')}` | {before:.2f} ({spread(times['before', command])}) | "
              f"{today:.2f} ({spread(times['today', command])}) | {before / today:.2f}x |")


if __name__ == "__main__":
    main()
