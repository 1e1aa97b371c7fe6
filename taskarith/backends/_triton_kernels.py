"""The Triton kernels behind :mod:`taskarith.backends._triton` (imported only when a kernel is needed).

The inputs arrive as one tuple of pointers (with a tuple of per-input scalars), and the steps per
input run in ``tl.static_range`` loops, which Triton writes out input by input: each number of
inputs ``K`` compiles a kernel of its own, as fast as one written for that number by hand. Triton
specialises each pointer of the tuple on its alignment, as it does a lone pointer argument.
"""

import triton
import triton.language as tl

if not hasattr(tl, "static_range") or not hasattr(tl, "tuple"):  # tuples as arguments: Triton 3.2 on
    raise ImportError("these kernels take tuples of pointers: they need a newer Triton")


@triton.jit
def _sum_kernel(out, xs, ws, n, K: tl.constexpr, BLOCK: tl.constexpr):
    # Accumulates in float32 whatever the storage dtype (bfloat16 and float16 round once, at the store).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    acc = tl.load(xs[0] + offs, mask=m, other=0.0).to(tl.float32) * ws[0]
    for i in tl.static_range(1, K):
        acc += tl.load(xs[i] + offs, mask=m, other=0.0).to(tl.float32) * ws[i]
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def _trim(x, offs, m, lam, w):
    v = tl.load(x + offs, mask=m, other=0.0)
    return tl.where(tl.abs(v) > lam, v, 0.0) * w


@triton.jit
def _agree(t, e):
    p = t * e
    return tl.where(p > 0, p, 0.0)


@triton.jit
def _vote(t):
    return tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))


@triton.jit
def _ties_kernel(out, xs, lams, ws, n, scale, K: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    # Every trimmed input is kept (a tuple of blocks) for the second pass: reading it again would
    # cost a second trip to memory where the first did not stay in cache.
    ts = (_trim(xs[0], offs, m, lams[0], ws[0]),)
    for i in tl.static_range(1, K):
        ts = ts + (_trim(xs[i], offs, m, lams[i], ws[i]),)
    if COUNT:
        votes = _vote(ts[0])
        for i in tl.static_range(1, K):
            votes += _vote(ts[i])
        positive = votes >= 0
    else:
        total = ts[0].to(tl.float64)
        for i in tl.static_range(1, K):
            total += ts[i].to(tl.float64)
        positive = total >= 0
    e = tl.where(positive, 1.0, -1.0)
    a = _agree(ts[0], e)
    kept = a
    count = tl.where(a > 0, 1.0, 0.0)
    for i in tl.static_range(1, K):
        a = _agree(ts[i], e)
        kept += a
        count += tl.where(a > 0, 1.0, 0.0)
    result = tl.math.div_rn(kept * e, tl.maximum(count, 1.0)) * scale
    tl.store(out + offs, result, mask=m)
