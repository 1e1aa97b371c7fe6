"""Merge methods: combine several task vectors into one.

The package's layout is its architecture:

* :mod:`._spec` — what a method is (:class:`Method`, :class:`Option`) and what it is handed (:class:`Block`);
* :mod:`._registry` — the one registry: built-ins listed explicitly, :func:`register` for yours;
* :mod:`._engine` — validation, planning and the in-memory driver :func:`merge` (the out-of-core
  driver, :mod:`taskarith.outofcore`, calls methods through the same :func:`._engine.call`);
* :mod:`._trim` — the one exact top-k trim plan; :mod:`._steps` — steps methods share;
* :mod:`._varying` — option values and weights that vary by tensor (gradients over layers, filters);
* one module per family: :mod:`.linear`, :mod:`.ties`, :mod:`.masks`, :mod:`.spectral`,
  :mod:`.consolidation`; mergekit's methods of weights (``inputs="weights"``): :mod:`.mergekit_gta`
  (with :mod:`.mergekit_sparsify`), :mod:`.interpolation`, :mod:`.selection`.

Conventions shared by every method:

* ``weights`` (one per vector, default 1) multiply each vector *after* its sparsification and
  *before* sign election (as mergekit does; PEFT elects the sign before weighting).
* half-precision deltas are merged in float32 and returned in their own dtype unless ``dtype=``
  says otherwise.
* every option is validated, and unknown names are listed, before any tensor is touched.
* a NaN in any input raises :class:`~taskarith.NonFiniteError` naming the vector and tensor;
  infinities follow IEEE arithmetic.
* the result carries the inputs' common base fingerprint.
"""

from ._engine import merge
from ._registry import methods, register, unregister
from ._spec import DENSITY, DROP, SCALE, SCOPE, SEED, SIGN, Block, Method, Option
from ._trim import trim
from ._varying import Varying, filtered, gradient

__all__ = ["DENSITY", "DROP", "SCALE", "SCOPE", "SEED", "SIGN", "Block", "Method", "Option", "Varying", "filtered",
           "gradient", "merge", "methods", "register", "trim", "unregister"]
