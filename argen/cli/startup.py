"""A command's heavy imports (torch, diffusers, argen's pipeline), with Python's cyclic collector paused.

Importing `argen.pipeline` creates about 520,000 Python objects (torch, and diffusers, which imports torch._dynamo and
transformers). While they are imported the collector runs about eight full passes over the growing heap (~0.9 s),
and at exit the interpreter's final collections walk all of them again (~1.4 s): together more than a third of
`argen generate`'s wall time for 16 images. Imported with the collector paused, then frozen (`gc.freeze`: moved to
a generation that no collection walks), they cost neither (docs/benchmarks.md, "Start-up of the command line").
A module's objects live as long as the process anyway; what freezing keeps is the cyclic garbage made while
importing (about 15,000 small objects). Only the command line does this: a library must not change its host
process's collector.
"""

from __future__ import annotations

import gc
import sys


def import_libraries() -> None:
    """Import torch, diffusers and every argen component (what each command needs past its argument checks),
    collector paused, then frozen. Call it before a command's first heavy import; a later call does nothing."""
    if "argen.pipeline" in sys.modules:  # a second command in one process (the tests)
        return
    collecting = gc.isenabled()
    gc.disable()
    try:
        import argen.pipeline  # noqa: F401 (torch, diffusers, the generators, tokenizers, refiners and samplers)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
