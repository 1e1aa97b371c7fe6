"""mergekit's merge methods as taskarith runs them: the registered method behind each name, the role of
the base model, how many inputs it takes, and its parameters (with mergekit's defaults).

Parameters are ``shared`` (one value for the merge, per tensor), ``input`` (one per input model, the
base included) or ``non_base`` (one per model other than the base). ``weight`` becomes the engine's
per-model weights; every other parameter becomes the method option of the same name (``lambda`` is
``lambda_``), per model as a tuple.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TABLE", "MergekitMethod", "option_name"]

REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class MergekitMethod:
    method: str  # the registered taskarith method
    base: str  # "required", "optional" (read when given) or "ignored" (the base is one more input model)
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    shared: dict = field(default_factory=dict)  # name -> default
    per_model: dict = field(default_factory=dict)  # name -> default
    per_model_scope: str = "non_base"
    native: str | None = None  # taskarith's own method of exact semantics, where one exists


def _gta(method: str, *, normalize: bool, rescale: bool, extra: dict | None = None, native: str | None = None):
    per_model = {"weight": REQUIRED, "density": 1.0, **(extra or {})}
    return MergekitMethod(method, "required", shared={"int8_mask": False, "normalize": normalize,
                                                      "rescale": rescale, "lambda": 1.0},
                          per_model=per_model, native=native)


TABLE: dict[str, MergekitMethod] = {
    "task_arithmetic": _gta("mergekit_task_arithmetic", normalize=False, rescale=False, native="task_arithmetic"),
    "ties": _gta("mergekit_ties", normalize=True, rescale=False, native="ties"),
    "dare_ties": _gta("mergekit_dare_ties", normalize=False, rescale=True, native="dare_ties"),
    "dare_linear": _gta("dare_linear", normalize=False, rescale=True),
    "breadcrumbs": _gta("mergekit_breadcrumbs", normalize=False, rescale=False, extra={"gamma": 0.01},
                        native="breadcrumbs"),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", normalize=False, rescale=False, extra={"gamma": 0.01}),
    "della": _gta("della", normalize=True, rescale=True, extra={"epsilon": 0.15}),
    "della_linear": _gta("della_linear", normalize=False, rescale=True, extra={"epsilon": 0.15}),
    "linear": MergekitMethod("linear", "ignored", shared={"normalize": True}, per_model={"weight": REQUIRED},
                             per_model_scope="input", native="mean"),
    "passthrough": MergekitMethod("passthrough", "ignored", max_inputs=1, per_model={"scale": None},
                                  per_model_scope="input"),
    "slerp": MergekitMethod("slerp", "required", min_inputs=2, max_inputs=2, shared={"t": REQUIRED}),
    "nuslerp": MergekitMethod("nuslerp", "optional", min_non_base=2, max_non_base=2,
                              shared={"nuslerp_row_wise": False, "nuslerp_flatten": True},
                              per_model={"weight": REQUIRED}),
    "multislerp": MergekitMethod("multislerp", "optional", min_non_base=1,
                                 shared={"normalize_weights": True, "eps": 1e-8}, per_model={"weight": REQUIRED}),
    "karcher": MergekitMethod("karcher", "ignored", shared={"max_iter": 10, "tol": 1e-5}),
    "model_stock": MergekitMethod("model_stock", "required", min_inputs=3, shared={"filter_wise": False}),
    "sce": MergekitMethod("sce", "required", shared={"int8_mask": False, "select_topk": 1.0}),
    "nearswap": MergekitMethod("nearswap", "required", min_inputs=2, max_inputs=2, shared={"t": REQUIRED}),
    "arcee_fusion": MergekitMethod("arcee_fusion", "required", min_inputs=2, max_inputs=2),
    "ram": MergekitMethod("ram", "required", shared={"epsilon": 1e-5}),
    "ramplus_tl": MergekitMethod("ramplus_tl", "required", shared={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
}


def option_name(parameter: str) -> str:
    """The taskarith option of a mergekit parameter (Python keywords get a trailing underscore)."""
    return "lambda_" if parameter == "lambda" else parameter
