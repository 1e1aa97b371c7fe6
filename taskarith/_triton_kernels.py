"""The Triton kernels behind :mod:`taskarith._triton` (imported only when a kernel is needed)."""

import triton
import triton.language as tl


@triton.jit
def _sum_kernel(out, x0, x1, x2, x3, n, w0, w1, w2, w3, K: tl.constexpr, BLOCK: tl.constexpr):
    # Accumulates in float32 whatever the storage dtype (bfloat16 and float16 round once, at the store).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    acc = tl.load(x0 + offs, mask=m, other=0.0).to(tl.float32) * w0
    if K > 1:
        acc += tl.load(x1 + offs, mask=m, other=0.0).to(tl.float32) * w1
    if K > 2:
        acc += tl.load(x2 + offs, mask=m, other=0.0).to(tl.float32) * w2
    if K > 3:
        acc += tl.load(x3 + offs, mask=m, other=0.0).to(tl.float32) * w3
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
def _ties_kernel(out, x0, x1, x2, x3, n, l0, l1, l2, l3, w0, w1, w2, w3, scale,
                 K: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t0 = _trim(x0, offs, m, l0, w0)
    t1 = t0
    t2 = t0
    t3 = t0
    if K > 1:
        t1 = _trim(x1, offs, m, l1, w1)
    if K > 2:
        t2 = _trim(x2, offs, m, l2, w2)
    if K > 3:
        t3 = _trim(x3, offs, m, l3, w3)
    if COUNT:
        votes = tl.where(t0 > 0, 1.0, tl.where(t0 < 0, -1.0, 0.0))
        if K > 1:
            votes += tl.where(t1 > 0, 1.0, tl.where(t1 < 0, -1.0, 0.0))
        if K > 2:
            votes += tl.where(t2 > 0, 1.0, tl.where(t2 < 0, -1.0, 0.0))
        if K > 3:
            votes += tl.where(t3 > 0, 1.0, tl.where(t3 < 0, -1.0, 0.0))
        positive = votes >= 0
    else:
        total = t0.to(tl.float64)
        if K > 1:
            total += t1.to(tl.float64)
        if K > 2:
            total += t2.to(tl.float64)
        if K > 3:
            total += t3.to(tl.float64)
        positive = total >= 0
    e = tl.where(positive, 1.0, -1.0)
    a = _agree(t0, e)
    kept = a
    count = tl.where(a > 0, 1.0, 0.0)
    if K > 1:
        a = _agree(t1, e)
        kept += a
        count += tl.where(a > 0, 1.0, 0.0)
    if K > 2:
        a = _agree(t2, e)
        kept += a
        count += tl.where(a > 0, 1.0, 0.0)
    if K > 3:
        a = _agree(t3, e)
        kept += a
        count += tl.where(a > 0, 1.0, 0.0)
    result = tl.math.div_rn(kept * e, tl.maximum(count, 1.0)) * scale
    tl.store(out + offs, result, mask=m)
