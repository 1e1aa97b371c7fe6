"""Integrated gradients of a task's objective with respect to the parameters, along the task vector.

For a model with pretrained weights ``θ0``, a task vector ``τ``, data ``D`` and
a scalar objective ``F`` (by default the mean log-probability of the true
labels), the attribution of parameter entry ``i`` is

    IG_i = τ_i · ∫_0^1 ∂F(θ0 + α·τ)/∂θ_i dα

and the attributions add up to the objective's change (completeness):
``Σ_i IG_i = F(θ0 + τ) − F(θ0)``. Entries with a large positive ``IG_i`` are
those whose move during fine-tuning raised the objective most;
:func:`~taskarith.consolidate` can keep those instead of the largest ones.

The integral is computed with Captum's ``IntegratedGradients`` (install the
``taskarith[attribution]`` extra); captum is imported only when
:func:`integrated_gradients` runs. The package also holds
:func:`~taskarith.consolidate` and :func:`tune_scale`.

The package: ``_integrated`` (the attribution), ``_data`` (batches, objective checks) and
``_consolidate`` (one vector from several by their scores; tuning its scale).
"""

from ._consolidate import DEFAULT_GRID, consolidate, tune_scale
from ._integrated import METHODS, Attribution, CompletenessWarning, integrated_gradients

__all__ = ["DEFAULT_GRID", "METHODS", "Attribution", "CompletenessWarning", "consolidate", "integrated_gradients",
           "tune_scale"]
