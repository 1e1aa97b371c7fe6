"""Shared hypothesis strategies: random state_dicts, model pairs and task vectors.

Values come from hypothesis itself (so failures shrink to small, readable
examples) and span many orders of magnitude, signed zeros included. Bounds keep
the arithmetic of each law inside the dtype's finite range.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import taskarith as ta

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# Largest magnitude drawn per dtype: sums of three values and products with
# scalars up to SCALE_BOUND stay finite.
MAX_ABS = {torch.float16: 1000.0, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e100}
SCALE_BOUND = 10.0

names = st.from_regex(r"[a-z]{1,6}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)  # 0-d and empty included
scalars = st.floats(-SCALE_BOUND, SCALE_BOUND, allow_nan=False, allow_infinity=False, width=32)


def _values(dtype: torch.dtype, max_abs: float, min_abs: float):
    finite = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    if min_abs > 0:
        finite = finite.filter(lambda v: v == 0 or abs(v) >= min_abs)
    return finite


@st.composite
def tensors(draw, shape, dtype, *, max_abs=None, min_abs=0.0):
    """A tensor of ``shape`` and ``dtype`` with hypothesis-drawn values."""
    max_abs = MAX_ABS[dtype] if max_abs is None else min(max_abs, MAX_ABS[dtype])
    array = draw(hnp.arrays(np.float64, shape, elements=_values(dtype, max_abs, min_abs)))
    return torch.from_numpy(array).to(dtype)


@st.composite
def layouts(draw, dtypes=FLOAT_DTYPES, min_keys=1, max_keys=5):
    """Ordered name -> (shape, dtype) for the float entries of a model."""
    keys = draw(st.lists(names, min_size=min_keys, max_size=max_keys, unique=True))
    dtype_pool = draw(st.lists(st.sampled_from(dtypes), min_size=1, max_size=2, unique=True))
    return {k: (draw(shapes), draw(st.sampled_from(dtype_pool))) for k in keys}


@st.composite
def state_dicts(draw, layout, *, int_buffers=(), max_abs=None, min_abs=0.0):
    """A state_dict with ``layout``'s float entries plus integer buffers named ``int_buffers``."""
    state = {
        k: draw(tensors(shape, dtype, max_abs=max_abs, min_abs=min_abs)) for k, (shape, dtype) in layout.items()
    }
    for k in int_buffers:
        state[k] = torch.tensor(draw(st.integers(0, 10_000)), dtype=torch.int64)
    return state


@st.composite
def model_pairs(draw, dtypes=FLOAT_DTYPES, *, min_abs=0.0, max_abs=None):
    """(pretrained, finetuned) state_dicts of one architecture.

    The fine-tuned model is either independent of the base or the base plus a
    small perturbation (what fine-tuning produces), so both regimes are tested.
    """
    layout = draw(layouts(dtypes))
    int_buffers = draw(st.lists(names.map(lambda n: n + ".num_batches_tracked"), max_size=2, unique=True))
    int_buffers = [n for n in int_buffers if n not in layout]
    base = draw(state_dicts(layout, int_buffers=int_buffers, max_abs=max_abs, min_abs=min_abs))
    if draw(st.booleans()):
        tuned = draw(state_dicts(layout, int_buffers=int_buffers, max_abs=max_abs, min_abs=min_abs))
    else:
        tuned = {}
        for k, t in base.items():
            if t.is_floating_point():
                noise = draw(tensors(tuple(t.shape), torch.float64, max_abs=1.0))
                tuned[k] = (t.double() + noise * 1e-2 * t.double().abs()).to(t.dtype)
            else:
                tuned[k] = t + 1
    return base, tuned


@st.composite
def vectors(draw, n=1, dtypes=FLOAT_DTYPES, max_abs=None):
    """``n`` task vectors sharing one layout (names, shapes, dtypes)."""
    layout = draw(layouts(dtypes))
    return [ta.TaskVector(draw(state_dicts(layout, max_abs=max_abs))) for _ in range(n)]


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny
