"""Out-of-core merging: checkpoints merged tensor by tensor, straight from disk to disk.

* :mod:`._driver` — :func:`merge_files`: plan → read (the one reader) → method (the engine's
  call, as in memory) → write (the one writer);
* :mod:`._select` — exact thresholds of trims too large to hold, by streamed radix selection;
* :mod:`._pieces` — element-wise methods a cache-sized piece at a time in kept buffers;
* :mod:`._memory` — the private-memory budget and progress.
"""

from ._driver import merge_files

__all__ = ["merge_files"]
