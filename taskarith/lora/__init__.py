"""LoRA adapters (the PEFT format) and task vectors, both ways.

* :func:`from_lora` reads an adapter folder as a dense :class:`~taskarith.TaskVector` (each
  ``B @ A`` product, scaled, named after the base parameter it changes); what is not such a delta
  (DoRA, other PEFT methods, …) is refused, naming the option.
* :func:`to_lora` factors a task vector into an adapter by a truncated SVD per layer (what
  ``TaskVector.to_lora`` runs) and reports each layer's relative error.

The package: ``_adapter`` (reading), ``_config`` (adapter configs: ranks, alphas, patterns),
``_checks`` (ranks, shapes, ``modules_to_save`` copies against the base), ``_extraction``
(writing) and ``_factor`` (the SVD).
"""

from ._adapter import from_lora
from ._extraction import EXACT_SVD_MAX, OVERSAMPLE, Extracted, LoraExtraction, layer_kinds, to_lora

__all__ = ["EXACT_SVD_MAX", "OVERSAMPLE", "Extracted", "LoraExtraction", "from_lora", "layer_kinds", "to_lora"]
