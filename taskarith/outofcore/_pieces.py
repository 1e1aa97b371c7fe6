"""Element-wise merges of row blocks a cache-sized piece at a time, in buffers kept across tensors."""

from __future__ import annotations

import torch

from .. import _extract, _flat
from ..backends import _numba
from ..merging import _checks

# Entries per piece of :meth:`Pieces.merge`: its dozen float32 scratch rows (1 MB each) stay in
# cache (the piece sizes measured are in docs/design.md, "Measurements").
_PIECE = 1 << 18
_KEPT_OUTPUTS = 3  # output buffers a merge keeps for reuse: one written, one filled, one spare


class Pieces:
    """Element-wise merges of row blocks a cache-sized piece at a time, in buffers kept across the
    tensors of one merge.

    Memory touched for the first time costs a page fault per page, several
    times the cost of filling memory already touched. So the scratch rows are
    allocated once per merge, and each output is written into a kept buffer
    that the writer no longer holds.
    """

    def __init__(self):
        self.scratch: dict[str, torch.Tensor] = {}
        self.outputs: list[torch.Tensor] = []

    def _rows(self, key: str, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.scratch.get(key)
        if buf is None or buf.dtype != dtype or buf.shape[0] < rows or buf.shape[1] < width:
            buf = self.scratch[key] = torch.empty(rows, max(width, buf.shape[1] if buf is not None else 0), dtype=dtype)
        return buf

    def output(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``n`` entries of a kept buffer no one else references (the writer lets go of a block once
        it is written), else of a new one, kept in place of the smallest free one."""
        free = [b for b in self.outputs if _flat._unshared(b)]
        for buf in sorted(free, key=torch.Tensor.numel):
            if buf.dtype == dtype and buf.numel() >= n:
                return buf[:n]
        buf = torch.empty(n, dtype=dtype)
        if len(self.outputs) >= _KEPT_OUTPUTS and free:
            smallest = min(free, key=torch.Tensor.numel)
            self.outputs = [b for b in self.outputs if b is not smallest]
        if len(self.outputs) < _KEPT_OUTPUTS:
            self.outputs.append(buf)
        return buf[:n]  # a view: the kept tensor itself is never handed out, so its use count tells

    def merge(self, fn, base: torch.Tensor, finetuned: list[torch.Tensor], out_dtype: torch.dtype,
              offset: int, *, checked: bool = True, plain_sum: bool = False) -> torch.Tensor | None:
        """``base + fn(deltas, base, start)`` of an element-wise method for one row block, ``fn`` called
        on flat pieces (``start``: a piece's first entry in the whole tensor).

        Computes exactly what the whole-block path computes (the deltas of
        :func:`_extract.delta_of`, ``fn`` on them, ``base + result`` rounded
        once), without its full-size temporaries. With ``checked``, returns None
        when a half-precision delta does not round-trip in float32: the
        whole-block path then decides the float64 fallback for the tensor, as
        :func:`taskarith.extract` does. ``checked=False``: float32 deltas were
        already decided for this tensor. The result is a view of a kept buffer,
        which is only reused once no view of it is left. ``plain_sum``: ``fn``
        is the unweighted sum of the deltas, which :func:`_numba.add_deltas` does
        in one pass where it can (its float32 check failing, the pieces below
        redo the block with the exact check).
        """
        b = base.reshape(-1)
        fts = [f.reshape(-1) for f in finetuned]
        n, count = b.numel(), len(fts)
        wide = _extract.delta_dtype(b.dtype, None)
        half = b.dtype != wide
        out = self.output(n, out_dtype)
        # A NaN in the one-pass sum sends the block to the pieces, whose method names the input holding it.
        if plain_sum and _numba.add_deltas(out, b, fts, checked=checked) and not _checks.any_nan([out]):
            return out.view(base.shape)
        width = min(n, _PIECE)
        base_wide = self._rows("base", 1, width, wide)[0] if half else None
        fts_wide = self._rows("finetuned", count, width, wide) if half else None
        deltas = self._rows("deltas", count, width, wide)
        gaps = self._rows("gaps", count, width, wide) if half and checked else None
        # Pieces start at multiples of _PIECE of the whole tensor, so a DARE mask block is drawn once.
        starts = [0, *range((-offset) % _PIECE or _PIECE, n, _PIECE)]
        for s, e in zip(starts, [*starts[1:], n]):
            m = e - s
            if half:
                wb = base_wide[:m].copy_(b[s:e])
                for i, f in enumerate(fts):
                    fts_wide[i, :m].copy_(f[s:e])
                d = torch.sub(fts_wide[:, :m], wb, out=deltas[:, :m])
                # Every input's round trip at once; an exact check per input only where that fails.
                if checked and not _extract.sums_equal(wb, d, fts_wide[:, :m], gaps[:, :m]) and not all(
                        _extract.round_trips(b[s:e], f[s:e], deltas[i, :m]) for i, f in enumerate(fts)):
                    return None
            else:
                wb = b[s:e]
                for i, f in enumerate(fts):
                    torch.sub(f[s:e], wb, out=deltas[i, :m])
            result = fn([deltas[i, :m] for i in range(count)], b[s:e], offset + s).reshape(-1)
            total = torch.promote_types(wb.dtype, result.dtype)
            if total == out_dtype:
                torch.add(wb if wb.dtype == total else wb.to(total), result, out=out[s:e])
            else:
                result_wide = self._rows("result", 1, width, total)[0]
                out[s:e].copy_(torch.add(wb if wb.dtype == total else wb.to(total), result, out=result_wide[:m]))
        return out.view(base.shape)
