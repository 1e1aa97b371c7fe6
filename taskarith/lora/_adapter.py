"""LoRA adapters (the PEFT format) as task vectors.

A LoRA adapter stores, for each adapted module, two small matrices ``A``
(``r × in``) and ``B`` (``out × r``); the weight change it makes is

    ``ΔW = s · B @ A``,  with ``s = lora_alpha / r`` (or ``lora_alpha / √r`` with ``use_rslora``),

transposed for layers that store their weight as ``(in, out)`` (GPT-2's
``Conv1D``, ``fan_in_fan_out``) and for embeddings (``lora_embedding_A`` is
``r × vocab``, ``lora_embedding_B`` is ``dim × r``, so ``ΔW = s · (B @ A)ᵀ``).
:func:`from_lora` turns every such product into a dense delta named after the
base parameter (``…q_proj.lora_A.weight`` → ``…q_proj.weight``), so an adapter
becomes an ordinary :class:`~taskarith.TaskVector`: scale it, add it to other
vectors, merge it, or apply it to any copy of its base model.

Anything whose effect is not such a delta is refused with a
:class:`~taskarith.TaskArithError` naming the option, rather than approximated:
DoRA, other PEFT methods (LoHa, LoKr, IA³, AdaLoRA, …), convolution LoRA,
layer replication, trainable tokens, LoRA variants with their own forward pass,
and initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA) unless the adapter was converted back to plain LoRA when saved.
Full weights stored in the adapter (``modules_to_save``, biases with
``bias="all"``/``"lora_only"``, embedding layers) become ``saved − base``
deltas, which needs the ``base``. PEFT trains a ``modules_to_save`` module as a
copy, so merging unties it from weights tied to it (``lm_head`` and
``embed_tokens`` with ``tie_word_embeddings``): the vector then gives each of
those names its own delta, as ``merge_and_unload()`` does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from .. import _extract
from ..errors import TaskArithError, format_names, raise_if_any
from ..io import Source, load_state_dict
from ..vector import TaskVector
from ._checks import _check_against_base, _check_ranks, _check_untie_fits, _trained_copies
from ._config import _FIX, CONFIG_FILE, WEIGHTS_FILE, _rank_and_scale, _read_config

__all__ = ["from_lora"]

PICKLE_WEIGHTS_FILE = "adapter_model.bin"
_WRAPPER_PREFIX = "base_model.model."

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.[^.]+)?\.(?P<param>weight|bias)$")
_EMBEDDING_FACTOR = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<side>A|B)(?:\.[^.]+)?$")

def from_lora(
    adapter: str | os.PathLike,
    *,
    base: Source | None = None,
    dtype: torch.dtype = torch.float32,
    full: bool = False,
    allow_pickle: bool = False,
) -> TaskVector:
    """The task vector of a PEFT LoRA adapter: one dense ``ΔW = s · B @ A`` per adapted weight.

    Args:
        adapter: a folder holding ``adapter_config.json`` and
            ``adapter_model.safetensors`` (or ``adapter_model.bin`` with
            ``allow_pickle=True``), as written by PEFT's ``save_pretrained``.
        base: the model the adapter was trained on (``nn.Module``, state_dict,
            ``.safetensors`` file or model folder). When given, every delta is
            checked to name a base entry of the same shape (all mismatches are
            reported at once), names follow the base's (a wrapper prefix
            present on one side only is bridged), weights tied in the base share
            one delta, and full weights stored in the adapter become
            ``saved − base``; a ``modules_to_save`` weight tied in the base is
            untied as PEFT's merge unties it (each name of the tie gets a delta,
            zero if unchanged: load the result with ``tie_word_embeddings=False``;
            a folder that ties the word embeddings cannot hold it and is refused,
            pass the loaded model). Without ``base``, names are the adapter's
            with PEFT's ``base_model.model.`` prefix removed.
        dtype: floating-point dtype in which ``B @ A`` is computed and stored.
        full: with ``base``, give every floating-point entry of the base a delta
            (zero where the adapter changes nothing), so that the vector
            combines with other vectors of the same base and applies with
            ``strict=True``. Without it, apply the vector with ``strict=False``.
        allow_pickle: permit pickle files, ``adapter_model.bin`` or a ``.bin``
            base (read with ``torch.load(weights_only=True)``).

    Returns:
        a :class:`~taskarith.TaskVector` of ``dtype`` deltas.

    Raises:
        TaskArithError: for missing or invalid files, invalid ``r``,
            ``lora_alpha``, ``rank_pattern`` or ``alpha_pattern`` values (all
            listed, before any tensor is read), unsupported PEFT methods or
            options (each named, with the reason), factors inconsistent with
            the config, and merges a vector cannot express;
            :class:`~taskarith.KeyMismatchError` /
            :class:`~taskarith.ShapeMismatchError` when ``base`` lacks a name or
            has another shape.

    Example:
        >>> import json, os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from taskarith.lora import from_lora
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        ...     json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 2}, f)
        >>> save_file({"base_model.model.proj.lora_A.weight": torch.ones(1, 3),
        ...            "base_model.model.proj.lora_B.weight": torch.ones(2, 1)},
        ...           os.path.join(folder, "adapter_model.safetensors"))
        >>> tv = from_lora(folder)
        >>> list(tv), tv["proj.weight"]
        (['proj.weight'], tensor([[2., 2., 2.],
                [2., 2., 2.]]))
    """
    _extract.check_float_dtype(dtype)
    if dtype is None:
        raise TaskArithError("dtype must be a floating-point torch.dtype, got None")
    if full and base is None:
        raise TaskArithError("full=True needs the base model: pass base=... (the model the adapter was trained on)")
    folder = Path(adapter)
    config = _read_config(folder)  # every value is checked before any tensor is read
    tensors = _read_weights(folder, allow_pickle=allow_pickle)
    factors, saved, layer_weights = _split(tensors, folder)
    _check_ranks(factors, config, folder / CONFIG_FILE)
    if saved and base is None:
        raise TaskArithError(
            f"the adapter stores {len(saved)} full weights ({format_names(saved)}) from modules_to_save, "
            "bias training or saved embedding layers; their deltas are 'saved − base', so pass base=... "
            "(the model the adapter was trained on)."
        )
    copies = _trained_copies(saved, layer_weights, config)
    _check_untie_fits(copies, saved, base)
    base_state = None if base is None else load_state_dict(base, allow_pickle=allow_pickle)
    deltas: dict[str, torch.Tensor] = {}
    rename = (lambda name: name) if base_state is None else _aligner([f"{m}.weight" for m in factors] + list(saved), base_state)
    _check_against_base(factors, saved, base_state, rename)
    for module, parts in factors.items():
        for name, delta in _lora_deltas(module, parts, config, base_state, rename, dtype).items():
            _accumulate(deltas, name, delta)
    from_factors = set(deltas)
    for name, value in saved.items():
        target = base_state[rename(name)]
        _accumulate(deltas, rename(name), value.to(dtype) - target.detach().to(dtype))
    if base_state is None:
        return TaskVector(deltas)
    # With ensure_weight_tying, PEFT saves the one trained copy of tied modules under each of their names.
    tied_copies = set(deltas) - from_factors if config.get("ensure_weight_tying") else set()
    return _in_base_terms(deltas, base_state, dtype, full, copies={rename(n) for n in copies}, tied_copies=tied_copies)


def _merge_terms(adapter: str | os.PathLike, base_state: Mapping[str, torch.Tensor], *,
                 base: Source | None = None) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """What PEFT's ``merge_and_unload`` does to the base entries an adapter changes, without computing it.

    ``base_state`` may hold meta tensors (names, shapes and dtypes are all it is read for); ``base``
    is the base's path, for the check of tied embeddings. Returns the full weights the adapter stores
    (``modules_to_save`` copies, trained biases), which replace the base's, and per base name the
    deltas added on top: callables of a dtype returning ``s · B @ A`` (or ``s · b``) computed in it.
    The adapter is checked as :func:`from_lora` checks it, before any tensor is computed.
    """
    folder = Path(adapter)
    config = _read_config(folder)
    factors, saved, layer_weights = _split(_read_weights(folder, allow_pickle=False), folder)
    _check_ranks(factors, config, folder / CONFIG_FILE)
    _check_untie_fits(_trained_copies(saved, layer_weights, config), saved, base)
    rename = _aligner([f"{m}.weight" for m in factors] + list(saved), base_state)
    _check_against_base(factors, saved, base_state, rename)
    deltas: dict[str, list] = {}
    for module, parts in factors.items():
        names = [f"{module}.weight"] + ([f"{module}.bias"] if "B.bias" in parts else [])
        for name in map(rename, names):
            deltas.setdefault(name, []).append(partial(_lora_delta, module, parts, config, base_state, rename, name))
    return {rename(n): t for n, t in saved.items()}, deltas


def _lora_delta(module, parts, config, base_state, rename, name: str, dtype: torch.dtype) -> torch.Tensor:
    return _lora_deltas(module, parts, config, base_state, rename, dtype)[name]


# ------------------------------------------------------------------ reading


def _read_weights(folder: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    for name in (WEIGHTS_FILE, PICKLE_WEIGHTS_FILE):
        if (folder / name).is_file():
            return load_state_dict(folder / name, allow_pickle=allow_pickle)
    raise TaskArithError(
        f"{str(folder)!r} holds {CONFIG_FILE} but no {WEIGHTS_FILE} (or {PICKLE_WEIGHTS_FILE}); "
        "the adapter was not saved completely."
    )


def _split(tensors: Mapping[str, torch.Tensor], folder: Path) -> tuple[dict, dict, set]:
    """LoRA factors grouped by module, full weights stored in the adapter under the model's names, and the
    names of those full weights that belong to a LoRA layer's base layer (not to a modules_to_save copy)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    layer_weights: set[str] = set()
    unsupported = []
    for key, tensor in tensors.items():
        name = key.removeprefix(_WRAPPER_PREFIX)
        if m := _FACTOR.match(name):
            kind = f"{m['side']}.{m['param']}"
            if kind == "A.bias":
                unsupported.append(f"{key!r} (a bias on lora_A)")
                continue
            factors.setdefault(m["module"], {})[kind] = tensor
        elif m := _EMBEDDING_FACTOR.match(name):
            factors.setdefault(m["module"], {})[f"embedding_{m['side']}"] = tensor
        elif any(part.startswith(("lora_", "hada_", "lokr_", "ia3_", "trainable_tokens")) for part in name.split(".")):
            unsupported.append(f"{key!r}")
        elif ".original_module." in f".{name}" or ".modules_to_save." in f".{name}":
            # The inner copies of a modules_to_save wrapper, picked up by bias="all": the wrapper's trained
            # values are also stored under the module's own names, which are the ones used.
            continue
        else:
            saved[name.replace(".base_layer.", ".")] = tensor
            if ".base_layer." in name:
                layer_weights.add(name.replace(".base_layer.", "."))
    raise_if_any(unsupported, error=TaskArithError, header=f"adapter tensors of an unsupported kind in {str(folder)!r}",
                 fix=_FIX)
    problems = []
    for module, parts in factors.items():
        linear, embedding = {"A.weight", "B.weight"} & parts.keys(), {"embedding_A", "embedding_B"} & parts.keys()
        if linear and embedding:
            problems.append(f"{module!r}: both linear and embedding factors")
        elif len(linear or embedding) != 2:
            problems.append(f"{module!r}: only {sorted(parts)} found, A and B come in pairs")
        elif any(parts[k].dim() != 2 for k in linear or embedding):
            a, b = (parts[k] for k in sorted(linear or embedding))
            kind = "convolution LoRA is not supported" if a.dim() == 4 else "LoRA factors are matrices"
            problems.append(f"{module!r}: factors of shapes {tuple(a.shape)} and {tuple(b.shape)} ({kind})")
    raise_if_any(problems, error=TaskArithError, header=f"malformed or unsupported LoRA factors in {str(folder)!r}",
                 fix=_FIX)
    return factors, saved, layer_weights


# ------------------------------------------------------------------ deltas


def _lora_deltas(module, parts, config, base_state, rename, dtype) -> dict[str, torch.Tensor]:
    scale = _rank_and_scale(module, config)[1]
    if "embedding_A" in parts:
        a, b = parts["embedding_A"].to(dtype), parts["embedding_B"].to(dtype)
        return {rename(f"{module}.weight"): (b @ a).T.mul_(scale).contiguous()}
    a, b = parts["A.weight"].to(dtype), parts["B.weight"].to(dtype)
    delta = (b @ a).mul_(scale)
    if _stores_transposed(module, delta.shape, config, base_state, rename):
        delta = delta.T.contiguous()
    out = {rename(f"{module}.weight"): delta}
    if "B.bias" in parts:
        out[rename(f"{module}.bias")] = parts["B.bias"].to(dtype) * scale
    return out


def _stores_transposed(module, shape, config, base_state, rename) -> bool:
    """Whether the base weight is stored ``(in, out)``: by its shape when that decides, else ``fan_in_fan_out``.

    PEFT itself uses the layer type (``Conv1D`` is transposed, ``nn.Linear`` is
    not) whatever the config says; a base's non-square shape tells the same.
    """
    if base_state is not None:
        target = tuple(base_state[rename(f"{module}.weight")].shape)
        out_in, in_out = tuple(shape), tuple(reversed(shape))
        if target != out_in or target != in_out:  # not square: the shape decides (mismatches were reported)
            return target == in_out
    return bool(config.get("fan_in_fan_out"))


def _accumulate(deltas: dict[str, torch.Tensor], name: str, delta: torch.Tensor) -> None:
    deltas[name] = deltas[name] + delta if name in deltas else delta


# ------------------------------------------------------------------ base


def _aligner(names: list[str], base_state: Mapping[str, torch.Tensor]):
    """A renaming of the adapter's parameter names onto the base's, bridging a prefix on either side.

    An adapter trained on ``LlamaForCausalLM`` names ``model.layers.0...``; a
    base given as the inner ``LlamaModel`` names ``layers.0...`` (and the other
    way round). The renaming must map every weight name, else names are kept and
    the check against the base reports them.
    """
    if not names or all(n in base_state for n in names):
        return lambda name: name
    first = names[0]
    prefixes = [b[: len(b) - len(first)] for b in base_state if b.endswith("." + first)]
    candidates = [_strip(k) for k in range(1, first.count("."))] + [_add(p) for p in prefixes]
    for rename in candidates:
        if all(rename(n) in base_state for n in names):
            return rename
    return lambda name: name


def _strip(count: int):
    return lambda name: name.split(".", count)[-1]


def _add(prefix: str):
    return lambda name: prefix + name


def _in_base_terms(deltas, base_state, dtype, full, *, copies=frozenset(), tied_copies=frozenset()) -> TaskVector:
    """Deltas in the base's order, weights tied in the base sharing one delta, zeros elsewhere if ``full``.

    A ``modules_to_save`` copy leaves its tied group; the names it leaves get a
    delta (zero if unchanged) even without ``full``, else ``apply_to`` would
    carry the copy's change over the base's tie. Several names of one group may
    have deltas only as equal ``tied_copies`` (``ensure_weight_tying`` saves
    the one trained copy under every tied name).
    """
    names = [n for n, t in base_state.items() if t.is_floating_point()]
    aliases = _extract.tied_groups(base_state, names)
    group_of = {n: (n, "copy") if n in copies else (aliases.get(n, n), "") for n in names}
    untied = {aliases.get(n, n) for n in copies}
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(group_of[name], []).append(name)
    doubled = []
    for group in groups.values():
        changed = [n for n in group if n in deltas]
        first = deltas[changed[0]] if changed else None
        if len(changed) > 1 and not all(n in tied_copies and torch.equal(deltas[n], first) for n in changed):
            doubled.append(f"{changed}")
    raise_if_any(doubled, error=TaskArithError, header="the adapter changes several names of one tied weight",
                 fix="Adapters on tied weights (e.g. embed_tokens and lm_head together) are not supported; " + _FIX)
    out: dict[str, torch.Tensor] = {}
    shared: dict[tuple, torch.Tensor] = {}
    for name in names:
        group = group_of[name]
        if group not in shared:
            member = next((n for n in groups[group] if n in deltas), None)
            if member is not None:
                shared[group] = deltas[member]
            elif full or aliases.get(name, name) in untied:
                shared[group] = torch.zeros(base_state[name].shape, dtype=dtype)
            else:
                continue
        out[name] = shared[group]
    vector = TaskVector(out)
    canonical = [n for n in out if n not in vector.aliases]
    vector._info = replace(vector._info, base_fingerprint=_extract.fingerprint(base_state, canonical))
    return vector
