"""Python's cyclic garbage collector around the start-up of a process jisu owns (the CLI, `jisu serve`).

Importing torch creates a few hundred thousand objects that live as long as the process. While they are being
created the collector walks them again and again, and afterwards every full collection walks them once more
(~100-160 ms on a 2-core host), in the middle of loading or of a decode step. So the imports run with the collector
off, and what they made moves to gc's permanent generation (`gc.freeze`), out of every later walk; the model's own
objects follow once it is loaded. The few thousand cyclic leftovers of the imports are frozen with them (~10 MB)
rather than collected: collecting them is one of those full walks, on the way to the first token.

Only for processes jisu owns: a library caller's objects are never frozen behind its back.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def imports_frozen():
    """The collector off for the block (the heavy imports), then what exists is frozen and the collector is on."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def freeze_loaded() -> None:
    """After the model is loaded: collect the loading's cyclic garbage (after imports_frozen, a walk over the
    loading's objects only: ~1 ms), then freeze what is left. Drop references to the checkpoint first: frozen, its
    cycles would never be freed."""
    gc.collect()
    gc.freeze()
