"""The Numba kernel of float64-accumulated inner products (``dot``, ``norm``, ``cosine``), imported
only when one is needed.

The sum is cut into fixed chunks of :data:`CHUNK` entries, each accumulated in float64 in eight
interleaved partial sums (so the loop is not one long chain of dependent additions) combined in a
fixed order; threads only share out the chunks. So the result does not depend on the thread count.
"""

import numpy as np
from numba import njit

from ._numba_kernels import _load

CHUNK = 1 << 16


@njit(nogil=True, cache=True, boundscheck=False)
def dot_chunks(a, b, partials, first, last):
    """``partials[c]`` = the float64 sum of ``a·b`` over chunk ``c``, for chunks ``[first, last)``."""
    n = a.size
    for c in range(first, last):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        j = lo
        while j + 8 <= hi:
            s0 += np.float64(_load(a, j)) * np.float64(_load(b, j))
            s1 += np.float64(_load(a, j + 1)) * np.float64(_load(b, j + 1))
            s2 += np.float64(_load(a, j + 2)) * np.float64(_load(b, j + 2))
            s3 += np.float64(_load(a, j + 3)) * np.float64(_load(b, j + 3))
            s4 += np.float64(_load(a, j + 4)) * np.float64(_load(b, j + 4))
            s5 += np.float64(_load(a, j + 5)) * np.float64(_load(b, j + 5))
            s6 += np.float64(_load(a, j + 6)) * np.float64(_load(b, j + 6))
            s7 += np.float64(_load(a, j + 7)) * np.float64(_load(b, j + 7))
            j += 8
        while j < hi:
            s0 += np.float64(_load(a, j)) * np.float64(_load(b, j))
            j += 1
        partials[c] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
