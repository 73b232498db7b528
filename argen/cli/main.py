"""`argen` command line. Thin: parse arguments, call the library, report errors in one line.

Each subcommand lives in its own module with `register(subparsers)`, which adds its parser
and sets `func`. Any `ArgenError` (bad input the user can fix) becomes one line on stderr and
exit code 2; so do argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import ArgenError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints full usage on errors; we want one line and exit code 2."""

    def error(self, message):
        raise ArgenError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, eval as eval_cmd, generate, train

    parser = OneLineParser(prog="argen", description="Fast autoregressive image generation.")
    parser.add_argument("--version", action="version", version=f"argen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for module in (generate, bench, eval_cmd, train):
        module.register(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except ArgenError as err:
        print(f"argen: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder made read-only meanwhile: the system's words, and the path
        where = f" ({err.filename!r})" if err.filename else ""
        print(f"argen: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("argen: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Close a multi-process run's process group (accelerate / torchrun launches) before the interpreter
    exits, as torch asks. (It does not stop gloo's worker threads; why they could still abort a finished
    process, and how that is avoided, is in `argen.distributed`.)"""
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
