"""Low-rank extraction: a task vector as a PEFT LoRA adapter, the reverse of :func:`taskarith.lora.from_lora`.

Each changed weight of an ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding`` layer is factored by a truncated
SVD ``Δ ≈ U_r S_r V_rᵀ``, split into ``B = U_r √S_r`` and ``A = √S_r V_rᵀ`` with ``lora_alpha = r`` (scaling 1),
so that PEFT's merge adds ``B @ A`` (transposed for ``Conv1D``, stored ``(in, out)``, and for embeddings, as PEFT
lays them out). A layer's rank is ``min(r, rows, cols)``, its factors zero-padded to ``r``; when ``r`` reaches a
delta's rank the adapter reproduces it exactly. The decisions (docs/interop.md has them in full):

* **SVD**: exact while ``min(rows, cols) <= EXACT_SVD_MAX`` or ``r + OVERSAMPLE`` exceeds half of it; above,
  randomized (torch.svd_lowrank's range finder, ``niter`` power iterations), its random matrix drawn on the CPU
  from a generator seeded by ``(seed, name)``: the same adapter on every run and device.
* **Deltas LoRA cannot express** (biases, norms, other layers, non-matrices): ``rest="full"`` stores them as
  ``base + Δ`` the ways PEFT saves trained weights (a LoRA layer's bias as ``<layer>.base_layer.bias``, the
  layout of ``bias="all"``; any other module through ``modules_to_save``), which needs ``base``;
  ``rest="drop"`` leaves them out. Modules PEFT cannot save so are refused, naming them.
* **target** chooses the layers to factor; the others are dropped unless their module is saved in full.
* **Embeddings** get embedding LoRA; a weight tied in the base gets one LoRA, whose merge changes the shared
  tensor, as ``τ`` does.
* **Layer types** come from ``base`` (a module, or a folder whose architecture transformers builds on the meta
  device); else every 2-D weight is taken as an ``nn.Linear`` one and embedding- or Conv1D-like names are refused.

The report lists every changed entry with its relative error ``‖Δ − stored‖_F / ‖Δ‖_F`` (1 when dropped).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._extract import check_float_dtype, tied_groups
from ..errors import KeyMismatchError, NonFiniteError, ShapeMismatchError, TaskArithError, format_names, raise_if_any
from ..io import Source, atomic_folder, check_output, load_state_dict, write_safetensors
from ..vector import TaskVector
from ._adapter import _aligner
from ._config import CONFIG_FILE, WEIGHTS_FILE
from ._factor import EXACT_SVD_MAX, OVERSAMPLE, factor, seed_of

__all__ = ["EXACT_SVD_MAX", "OVERSAMPLE", "Extracted", "LoraExtraction", "layer_kinds", "to_lora"]

_PREFIX = "base_model.model."
_LORA_KINDS = ("linear", "conv1d", "embedding")
# Typical names of embedding and GPT-2 Conv1D layers: refused when the base gives no layer types.
_SUSPECT = {"embed_tokens", "embed_in", "embed_positions", "embeddings", "word_embeddings", "position_embeddings",
            "token_type_embeddings", "tok_embeddings", "wte", "wpe", "shared", "c_attn", "c_fc", "c_proj"}


@dataclass(frozen=True)
class Extracted:
    """How one (changed) entry of the vector went into the adapter.

    ``how`` is ``"lora"``, ``"full"`` or ``"dropped"``; ``rank`` the rank of its factors before
    zero-padding (0 unless LoRA); ``error`` its relative Frobenius error ``‖Δ − stored‖ / ‖Δ‖``;
    ``svd`` ``"exact"`` or ``"randomized"`` for LoRA; ``note`` the layer kind (``linear``, ``conv1d``,
    ``embedding``) for LoRA, else how or why it was stored or dropped.
    """

    name: str
    how: str
    shape: tuple[int, ...]
    rank: int = 0
    error: float = 0.0
    svd: str = ""
    note: str = ""


class LoraExtraction:
    """A PEFT LoRA adapter in memory: :attr:`tensors` (``adapter_model.safetensors``), :attr:`config`
    (``adapter_config.json``) and :attr:`report` (name -> :class:`Extracted`); :meth:`save` writes it."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, report: dict[str, Extracted]):
        self.tensors, self.config, self.report = tensors, config, report

    @property
    def worst(self) -> Extracted | None:
        """The entry with the largest relative error (dropped entries count 1)."""
        return max(self.report.values(), key=lambda e: e.error, default=None)

    def summary(self) -> str:
        """One line: what the adapter holds and its worst relative error."""
        count = {h: sum(e.how == h for e in self.report.values()) for h in ("lora", "full", "dropped")}
        worst = self.worst
        return (f"{count['lora']} LoRA layers at rank {self.config['r']}, {count['full']} tensors in full, "
                f"{count['dropped']} dropped; worst relative error {worst.error:.3g} ({worst.name})")

    def as_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {"rank": self.config["r"], "worst": asdict(self.worst), "summary": self.summary(),
                "entries": [asdict(e) for e in self.report.values()]}

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``, atomically, under
        taskarith's output policy (:func:`taskarith.io.check_output`); returns the folder. Load it with
        ``peft.PeftModel.from_pretrained(base_model, folder)`` or :func:`taskarith.lora.from_lora`."""
        out = check_output(folder, overwrite=overwrite, folder=True)
        with atomic_folder(out) as tmp:
            write_safetensors(tmp / WEIGHTS_FILE, list(self.tensors.items()), {"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        return out

    def __repr__(self) -> str:
        return f"LoraExtraction({self.summary()})"


def to_lora(vector: TaskVector, rank: int, *, base: Source | None = None, target: str | Sequence[str] | None = None,
            rest: str = "full", randomized: bool | None = None, niter: int = 2, seed: int = 0,
            dtype: torch.dtype | None = None, allow_pickle: bool = False) -> LoraExtraction:
    """The LoRA adapter of rank ``rank`` closest to ``vector`` (truncated SVD per layer); nothing is written.

    Args:
        vector: the task vector (``finetuned − base``).
        rank: the LoRA rank ``r`` (``lora_alpha = r``: scaling 1), a positive integer.
        base: the model the vector was extracted from (``nn.Module``, state_dict, ``.safetensors`` file or
            model folder): gives the layer types (a module, or a folder with ``config.json``) and the values
            of the entries stored in full. Without it, deltas LoRA cannot express need ``rest="drop"``.
        target: the layers to factor: a regular expression matched against whole module names, or module
            names matched whole or as a dotted suffix (``"q_proj"``), as PEFT's ``target_modules``.
            Default: every changed ``Linear``, ``Conv1D`` and ``Embedding`` weight.
        rest: ``"full"`` stores biases, norms and other deltas LoRA cannot express in full (needs
            ``base``); ``"drop"`` leaves them out. Both are listed in the report.
        randomized: force (True) or forbid (False) the randomized SVD; None picks by size
            (:data:`EXACT_SVD_MAX`).
        niter: power iterations of the randomized SVD (more: slower, closer to the exact SVD).
        seed: seed of the randomized SVD's draws.
        dtype: dtype of the LoRA factors (default: the deltas'). The SVD runs in float32 (float64 for
            float64 deltas); errors are measured with the factors as stored.
        allow_pickle: permit a pickle checkpoint as ``base``.

    Returns:
        a :class:`LoraExtraction`; ``.save(folder)`` writes the PEFT adapter folder.

    Raises:
        TaskArithError: bad options, deltas LoRA cannot express without ``base`` (``rest="full"``),
            modules PEFT cannot save in full, a ``target`` matching nothing, only zero deltas;
            :class:`~taskarith.KeyMismatchError` / :class:`~taskarith.ShapeMismatchError` when ``base``
            lacks an entry or has another shape; :class:`~taskarith.NonFiniteError` for NaN/inf deltas.

    Example:
        >>> import torch, taskarith as ta
        >>> from taskarith.lora import to_lora
        >>> b, a = torch.randn(6, 2), torch.randn(2, 4)
        >>> tv = ta.TaskVector({"proj.weight": b @ a})
        >>> lora = to_lora(tv, 2)
        >>> sorted(lora.tensors), lora.report["proj.weight"].error < 1e-5
        (['base_model.model.proj.lora_A.weight', 'base_model.model.proj.lora_B.weight'], True)
    """
    check_options(rank, target=target, rest=rest, randomized=randomized, niter=niter, seed=seed, dtype=dtype)
    kinds = layer_kinds(base)
    state = None if base is None else load_state_dict(base, allow_pickle=allow_pickle)
    name_or_path = os.fspath(base) if isinstance(base, (str, os.PathLike)) else getattr(base, "name_or_path", None)
    return extract(vector, rank, state=state, kinds=kinds, base_name_or_path=name_or_path, target=target, rest=rest,
                   randomized=randomized, niter=niter, seed=seed, dtype=dtype)


def check_options(rank, *, target=None, rest="full", randomized=None, niter=2, seed=0, dtype=None) -> None:
    """Raise a :class:`TaskArithError` naming every invalid option (before any tensor is read)."""
    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool)

    problems = [] if whole(rank) and rank > 0 else [f"rank={rank!r}: expected a positive integer"]
    problems += [] if whole(niter) and niter >= 0 else [f"niter={niter!r}: expected a non-negative integer"]
    problems += [] if whole(seed) else [f"seed={seed!r}: expected an integer"]
    problems += [] if rest in ("full", "drop") else [f"rest={rest!r}: expected 'full' or 'drop'"]
    problems += [] if randomized in (None, True, False) else [f"randomized={randomized!r}: expected None, True or False"]
    if isinstance(target, str):
        try:
            re.compile(target)
        except re.error as err:
            problems.append(f"target={target!r}: not a valid regular expression ({err})")
    elif target is not None and (not isinstance(target, Sequence) or not target
                                 or not all(isinstance(t, str) and t for t in target)):
        problems.append(f"target={target!r}: expected a regular expression or a non-empty list of module names")
    raise_if_any(problems, error=TaskArithError, header="invalid LoRA extraction options",
                 fix="See help(taskarith.lora.to_lora).")
    check_float_dtype(dtype)


def layer_kinds(base: Source | None) -> dict[str, str] | None:
    """Module name -> ``"linear"``, ``"conv1d"``, ``"embedding"`` or ``"other"`` for a module or a Hugging Face
    folder whose architecture transformers can build (on the meta device); None when ``base`` tells no types."""
    if isinstance(base, torch.nn.Module):
        return _kinds(base)
    folder = Path(base) if isinstance(base, (str, os.PathLike)) else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_class = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        if model_class is None:
            return None
        with torch.device("meta"):
            return _kinds(model_class(config))
    except Exception:  # noqa: BLE001  (no transformers, custom code, a config this version cannot build): no types
        return None


def _kinds(model: torch.nn.Module) -> dict[str, str]:
    def kind(m):
        if isinstance(m, torch.nn.Embedding):
            return "embedding"
        if isinstance(m, torch.nn.Linear):
            return "linear"
        weight = getattr(m, "weight", None)  # transformers' Conv1D, by name: transformers is optional
        return "conv1d" if type(m).__name__ == "Conv1D" and getattr(weight, "dim", lambda: 0)() == 2 else "other"
    return {name: kind(m) for name, m in model.named_modules()}


def extract(vector: TaskVector, rank: int, *, state: Mapping[str, torch.Tensor] | None, kinds: dict | None,
            base_name_or_path: str | None = None, target=None, rest="full", randomized=None, niter=2, seed=0,
            dtype=None) -> LoraExtraction:
    """:func:`to_lora` on a loaded base ``state`` and its ``kinds`` (:func:`layer_kinds`), options checked."""
    aliases = vector.aliases
    names = [n for n in vector if n not in aliases]
    rename = (lambda n: n) if state is None else _aligner(names, state)
    _check_fit(vector, names, state, rename)
    deltas = {rename(n): vector[n] for n in names if vector[n].any()}
    raise_if_any([f"{n!r}" for n, d in deltas.items() if not bool(torch.isfinite(d).all())], error=NonFiniteError,
                 header="deltas holding NaN or inf", fix="Extract the vector from finite weights.")
    if not deltas:
        raise TaskArithError("every delta of the vector is zero: there is nothing to extract")
    modules = set(kinds or ()) | {n.rsplit(".", k)[0] for n in (state or deltas) for k in range(1, n.count(".") + 1)}
    kind = _kind_of(kinds, deltas, target)
    loras = {n.rpartition(".")[0]: kind[n] for n in deltas if kind.get(n) in _LORA_KINDS and _selected(n, target)}
    if target is not None and not loras:
        raise TaskArithError(f"target={target!r} matches none of the changed Linear, Conv1D or Embedding layers")
    groups = tied_groups(state, [n for n, t in state.items() if t.is_floating_point()]) if state is not None else {}
    report, tensors, full_plan = {}, {}, _plan_rest(deltas, kind, loras, state, groups, modules, rest)
    square_linear = [m for m, k in loras.items() if k == "linear" and deltas[f"{m}.weight"].shape[0] ==
                     deltas[f"{m}.weight"].shape[1]]
    if "conv1d" in loras.values() and square_linear:
        raise TaskArithError(
            f"the adapter would mix GPT-2 Conv1D layers with square nn.Linear layers ({format_names(square_linear)}): "
            "fan_in_fan_out cannot describe both, so readers that go by the config transpose one kind. Extract "
            "them as two adapters with target=...")
    doubled = {}
    for module in loras:
        doubled.setdefault(groups.get(f"{module}.weight", f"{module}.weight"), []).append(module)
    raise_if_any([f"{v}" for v in doubled.values() if len(v) > 1], error=TaskArithError,
                 header="the vector changes several names of one tied weight",
                 fix="Give the vector one delta per tied weight (extract it from the loaded models).")
    for module, layer in loras.items():
        name = f"{module}.weight"
        b, a, k, error, how = factor(deltas[name], layer, rank, randomized, niter, seed_of(seed, name), dtype)
        side_a, side_b = ("lora_embedding_A", "lora_embedding_B") if layer == "embedding" else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{_PREFIX}{module}.{side_a}"], tensors[f"{_PREFIX}{module}.{side_b}"] = a, b
        report[name] = Extracted(name, "lora", tuple(deltas[name].shape), k, error, how, layer)
    saved_modules = []
    for name, (how, note) in full_plan.items():
        module, _, leaf = name.rpartition(".")
        if how == "dropped":
            report[name] = Extracted(name, "dropped", tuple(deltas[name].shape), error=1.0, note=note)
            continue
        if module not in loras and module not in saved_modules:
            saved_modules.append(module)
        key = f"{_PREFIX}{module}.base_layer.{leaf}" if module in loras else _PREFIX + name
        base = state[name]
        if name not in deltas:  # an unchanged entry of a module saved in full
            tensors[key] = base.clone()
            continue
        delta = deltas[name]
        compute = torch.float64 if torch.float64 in (delta.dtype, base.dtype) else torch.float32
        start = base.to(delta.device, compute)
        tensors[key] = (start + delta.to(compute)).to(base.dtype)
        error = float((tensors[key].to(compute) - start - delta).norm() / delta.to(compute).norm())
        report[name] = Extracted(name, "full", tuple(delta.shape), error=error, note=note)
    report = {n: report[n] for n in deltas if n in report}
    layer_entries = any(how == "full" and n.rpartition(".")[0] in loras for n, (how, _) in full_plan.items())
    config = {
        "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank, "use_rslora": False,
        "target_modules": _peft_targets(list(loras), modules), "fan_in_fan_out": "conv1d" in loras.values(),
        "bias": "all" if layer_entries else "none", "modules_to_save": saved_modules or None, "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_name_or_path,
    }
    return LoraExtraction(tensors, config, report)


# ------------------------------------------------------------------ pieces


def _check_fit(vector, names, state, rename) -> None:
    if state is None:
        return
    missing = [rename(n) for n in names if rename(n) not in state]
    if missing:
        raise KeyMismatchError(f"the base lacks {len(missing)} entries of the vector: {format_names(missing)}. "
                               "Pass the model the vector was extracted from.", missing=missing)
    shapes = [f"{rename(n)!r}: delta {tuple(vector[n].shape)}, base {tuple(state[rename(n)].shape)}" for n in names
              if tuple(vector[n].shape) != tuple(state[rename(n)].shape)]
    raise_if_any(shapes, error=ShapeMismatchError, header="the vector does not fit the base",
                 fix="Pass the model the vector was extracted from.")


def _kind_of(kinds, deltas, target) -> dict[str, str]:
    """Entry name -> the LoRA kind of its layer (``linear``, ``conv1d``, ``embedding``) for changed 2-D weights."""
    out, suspects = {}, []
    for name, delta in deltas.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or delta.dim() != 2 or not module:
            continue
        if kinds is not None:
            out[name] = kinds.get(module, "other")
        elif module.rpartition(".")[2] in _SUSPECT and _selected(name, target):
            suspects.append(name)
        else:
            out[name] = "linear"
    if suspects:
        raise TaskArithError(
            f"cannot tell whether {format_names(suspects)} belong to nn.Linear, nn.Embedding or GPT-2 Conv1D layers "
            "(their LoRA factors differ): pass base= as the model (nn.Module) or its Hugging Face folder.")
    return out


def _selected(name: str, target) -> bool:
    module = name.rpartition(".")[0]
    if target is None:
        return True
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def _plan_rest(deltas, kind, loras, state, groups, modules, rest) -> dict[str, tuple[str, str]]:
    """name -> (``"full"`` or ``"dropped"``, how or why) for every entry that is not a LoRA weight; a module
    saved in full lists all its entries (changed or not), as PEFT's ``modules_to_save`` needs them."""
    plan, owners = {}, []
    for name in deltas:
        module = name.rpartition(".")[0]
        if module in loras and name == f"{module}.weight":
            continue
        if kind.get(name) in _LORA_KINDS:
            plan[name] = ("dropped", "left out by target")
        elif rest == "drop":
            plan[name] = ("dropped", "LoRA cannot express it (rest='drop')")
        elif module in loras:  # stored as <layer>.base_layer.<leaf>, the layout of PEFT's bias="all"
            plan[name] = ("full", "bias of a LoRA layer" if name.endswith(".bias") else "entry of a LoRA layer")
        else:
            owners += [] if module in owners else [module]
            plan[name] = ("full", "modules_to_save")
    stored = [n for n, (how, _) in plan.items() if how == "full"]
    if stored and state is None:
        raise TaskArithError(
            f"{len(stored)} deltas LoRA cannot express ({format_names(stored)}) are stored in full as base + delta: "
            "pass base=... (the model the vector was extracted from), or rest='drop' to leave them out.")
    problems, ambiguous = [], _suffix_clashes(owners, modules)
    for module in owners:
        inside = [n for n in state if n.startswith(f"{module}.")]
        tied_out = [n for n in inside if any(m != n and not m.startswith(f"{module}.") and groups.get(m, m) ==
                                              groups.get(n, n) for m in state)] if groups else []
        why = ("it is the model's root" if not module else
               "it holds LoRA layers" if any(m.startswith(f"{module}.") for m in loras) else
               f"it is tied to weights outside it ({format_names(tied_out)})" if tied_out else
               "PEFT matches modules_to_save by suffix and its name ends another module's" if module in ambiguous
               else "")
        if why:
            problems.append(f"{module!r}: {why}")
            continue
        plan.update({n: ("full", "modules_to_save") for n in inside})
    raise_if_any(problems, error=TaskArithError, header="modules PEFT cannot save in full (modules_to_save)",
                 fix="Pass rest='drop' to leave their deltas out.")
    return plan


def _suffix_clashes(owners: list[str], modules: set[str]) -> set[str]:
    """The owners that PEFT's ``modules_to_save`` test (``name.endswith(entry)``) would match elsewhere too."""
    wanted = set(owners)
    return {m[i:] for m in modules for i in range(1, len(m)) if m[i:] in wanted}


def _peft_targets(targets: list[str], modules: set[str]) -> list[str] | str:
    """``target_modules`` naming exactly ``targets``: their names, or (when one is a dotted suffix of another
    module's name, which PEFT would match too) a regular expression of them."""
    wanted = set(targets)
    if any(m not in wanted and m.split(".", k)[-1] in wanted for m in modules for k in range(1, m.count(".") + 1)):
        return "|".join(re.escape(t) for t in targets)
    return targets
