"""``no_collection``: a pause of the cyclic garbage collector around a burst of objects that all
live on (its own module: the walk's result, the layout reader and the receiver's shell use it,
and none of them may import more than it needs)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """No cyclic garbage collection while the block runs: for a burst that makes tens of
    thousands of objects that all live on (a manifest's entries, a layout's rows), where the
    collections it would trigger find nothing to free. The collector is enabled again after
    it if it was before (a pause in another thread meanwhile at worst ends early)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
