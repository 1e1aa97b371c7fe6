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
deltas, which needs the ``base``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from . import _extract
from .errors import KeyMismatchError, ShapeMismatchError, TaskArithError, format_names, raise_if_any
from .io import Source, load_state_dict
from .vector import TaskVector

__all__ = ["from_lora"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
_WRAPPER_PREFIX = "base_model.model."

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.[^.]+)?\.(?P<param>weight|bias)$")
_EMBEDDING_FACTOR = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<side>A|B)(?:\.[^.]+)?$")

_FIX = ("Merge the adapter with PEFT instead (model = peft_model.merge_and_unload()) and build the vector with "
        "TaskVector.from_models(base, model).")

# Options that, when set, make the adapter's effect something other than s·B@A on the base weights.
_REFUSED = {
    "use_dora": "DoRA rescales every column of W + ΔW by a learned magnitude, which is not a low-rank delta",
    "layer_replication": "layer replication builds a deeper model than the base, so no delta of the base describes it",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens store sparse embedding rows, which are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) only acts after its invocation tokens and cannot be merged",
    "use_qalora": "QALoRA pools the input before A, so ΔW is not B @ A",
    "monteclora_config": "MonteCLoRA samples its factors, so the adapter has no single ΔW",
    "use_bdlora": "BD-LoRA stores block-diagonal factors, which are not supported",
    "arrow_config": "Arrow routes tokens between several LoRA experts, so the adapter has no single ΔW",
    "kasa_config": "KaSA inserts learned singular values between A and B and truncates the base weight",
}
# Options that only steer training, targeting or (for the refused inits) initialisation: they do not change ΔW.
_HARMLESS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
    "megatron_config", "megatron_core", "modules_to_save", "peft_type", "peft_version", "qalora_group_size", "r",
    "rank_pattern", "revision", "runtime_config", "target_modules", "task_type", "use_rslora", "velora_config",
}
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


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
            ``saved − base``. Without it, names are the adapter's with PEFT's
            ``base_model.model.`` prefix removed.
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
        TaskArithError: for missing or invalid files, unsupported PEFT methods or
            options (each named, with the reason), and factors inconsistent with
            the config; :class:`~taskarith.KeyMismatchError` /
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
    config = _read_config(folder)
    tensors = _read_weights(folder, allow_pickle=allow_pickle)
    factors, saved = _split(tensors, folder)
    _check_ranks(factors, config)
    if saved and base is None:
        raise TaskArithError(
            f"the adapter stores {len(saved)} full weights ({format_names(saved)}) from modules_to_save, "
            "bias training or saved embedding layers; their deltas are 'saved − base', so pass base=... "
            "(the model the adapter was trained on)."
        )
    base_state = None if base is None else load_state_dict(base, allow_pickle=allow_pickle)
    deltas: dict[str, torch.Tensor] = {}
    rename = (lambda name: name) if base_state is None else _aligner([f"{m}.weight" for m in factors] + list(saved), base_state)
    _check_against_base(factors, saved, base_state, rename)
    for module, parts in factors.items():
        for name, delta in _lora_deltas(module, parts, config, base_state, rename, dtype).items():
            _accumulate(deltas, name, delta)
    for name, value in saved.items():
        target = base_state[rename(name)]
        _accumulate(deltas, rename(name), value.to(dtype) - target.detach().to(dtype))
    if base_state is None:
        return TaskVector(deltas)
    return _in_base_terms(deltas, base_state, dtype, full)


# ------------------------------------------------------------------ reading


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise TaskArithError(
            f"{str(folder)!r} is not a folder: pass the folder PEFT's save_pretrained wrote "
            f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}"))
        hint = f" Adapters were found in the subfolders {nested}: pass one of them." if nested else ""
        raise TaskArithError(f"{str(folder)!r} holds no {CONFIG_FILE}, so it is not a PEFT adapter folder.{hint}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskArithError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise TaskArithError(f"{str(path)!r} holds a {type(config).__name__}, not a JSON object")
    _check_config(config, path)
    return config


def _check_config(config: dict, path: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise TaskArithError(
            f"{str(path)!r} describes a {config.get('peft_type')!r} adapter; only peft_type 'LORA' adapters are "
            f"deltas of the form s·B@A (LoHa, LoKr, IA3, AdaLoRA, prompt tuning and others are not supported). {_FIX}"
        )
    problems = [f"{key}={config[key]!r}: {why}" for key, why in _REFUSED.items() if config.get(key)]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(
            f"init_lora_weights={init!r}: this initialisation rewrites the base weights, so the adapter is relative "
            "to a base you do not have (save it with PEFT's path_initial_model_for_weight_conversion to get a plain "
            "LoRA adapter of the original base)"
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        problems.append(f"bias={config.get('bias')!r}: expected 'none', 'all' or 'lora_only'")
    unknown = sorted(k for k, v in config.items() if k not in _HARMLESS and k not in _REFUSED and v)
    problems += [f"{k}={config[k]!r}: an option this version of taskarith does not know" for k in unknown]
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{key}={value!r}: expected a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, Mapping):
            problems.append(f"{key}={config.get(key)!r}: expected a mapping of module patterns to numbers")
    raise_if_any(problems, error=TaskArithError, header=f"unsupported LoRA adapter {str(path)!r}", fix=_FIX)


def _read_weights(folder: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    for name in (WEIGHTS_FILE, PICKLE_WEIGHTS_FILE):
        if (folder / name).is_file():
            return load_state_dict(folder / name, allow_pickle=allow_pickle)
    raise TaskArithError(
        f"{str(folder)!r} holds {CONFIG_FILE} but no {WEIGHTS_FILE} (or {PICKLE_WEIGHTS_FILE}); "
        "the adapter was not saved completely."
    )


def _split(tensors: Mapping[str, torch.Tensor], folder: Path) -> tuple[dict, dict]:
    """LoRA factors grouped by module, and full weights stored in the adapter, under the model's names."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
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
    raise_if_any(unsupported, error=TaskArithError, header=f"adapter tensors of an unsupported kind in {str(folder)!r}",
                 fix=_FIX)
    problems = []
    for module, parts in factors.items():
        linear, embedding = {"A.weight", "B.weight"} & parts.keys(), {"embedding_A", "embedding_B"} & parts.keys()
        if linear and embedding:
            problems.append(f"{module!r}: both linear and embedding factors")
        elif len(linear or embedding) != 2:
            problems.append(f"{module!r}: only {sorted(parts)} found, A and B come in pairs")
        elif linear and (parts["A.weight"].dim() != 2 or parts["B.weight"].dim() != 2):
            problems.append(
                f"{module!r}: factors of shapes {tuple(parts['A.weight'].shape)} and {tuple(parts['B.weight'].shape)} "
                "(convolution LoRA is not supported)"
            )
    raise_if_any(problems, error=TaskArithError, header=f"malformed or unsupported LoRA factors in {str(folder)!r}",
                 fix=_FIX)
    return factors, saved


# ------------------------------------------------------------------ deltas


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """The value of the first pattern (in the config's order) that matches the end of ``module``.

    A pattern is a regular expression that must match the whole module name or a
    dotted suffix of it: ``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``
    but not ``"model.layers.0.self_attn.xq_proj"``.
    """
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _rank_and_scale(module: str, config: dict) -> tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


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


def _check_ranks(factors, config) -> None:
    problems = []
    for module, parts in factors.items():
        r = _rank_and_scale(module, config)[0]
        a, b = (parts["embedding_A"], parts["embedding_B"]) if "embedding_A" in parts else (parts["A.weight"], parts["B.weight"])
        if a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} have rank {a.shape[0]} and "
                            f"{b.shape[1]}, the config says r={r}")
    raise_if_any(problems, error=TaskArithError, header="adapter_config.json does not match the saved factors",
                 fix="Check r and rank_pattern in adapter_config.json: the scaling s = alpha / r depends on them.")


def _check_against_base(factors, saved, base_state, rename) -> None:
    if base_state is None:
        return
    missing, problems = [], []
    expected: dict[str, tuple] = {}
    for module, parts in factors.items():
        if "embedding_A" in parts:
            expected[f"{module}.weight"] = (parts["embedding_A"].shape[1], parts["embedding_B"].shape[0])
        else:
            out_in = (parts["B.weight"].shape[0], parts["A.weight"].shape[1])
            expected[f"{module}.weight"] = out_in
            if "B.bias" in parts:
                expected[f"{module}.bias"] = tuple(parts["B.bias"].shape)
    expected.update({n: tuple(t.shape) for n, t in saved.items()})
    for name, shape in expected.items():
        target = rename(name)
        if target not in base_state:
            missing.append(target)
            continue
        got = tuple(base_state[target].shape)
        linear = name.endswith(".weight") and "A.weight" in factors.get(name[: -len(".weight")], {})
        layouts = {shape, tuple(reversed(shape))} if linear else {shape}
        if got not in layouts:
            problems.append(f"{target!r}: the adapter makes a delta of shape {shape}, the base entry is {got}")
        elif not base_state[target].is_floating_point():
            problems.append(f"{target!r}: the base entry is {base_state[target].dtype}, not floating-point")
    if missing:
        raise KeyMismatchError(
            f"the adapter changes {len(missing)} weights the base does not have: {format_names(missing)}"
            + (f"; shape problems too: {'; '.join(problems)}" if problems else "")
            + ". Pass the base model the adapter was trained on (as a module if it ties weights that its "
            "saved folder leaves out, such as lm_head.weight).",
            missing=missing,
        )
    raise_if_any(problems, error=ShapeMismatchError, header="the adapter does not fit the base",
                 fix="Pass the base model the adapter was trained on.")


def _in_base_terms(deltas, base_state, dtype, full) -> TaskVector:
    """Deltas in the base's order, weights tied in the base sharing one delta, zeros elsewhere if ``full``."""
    names = [n for n, t in base_state.items() if t.is_floating_point()]
    aliases = _extract.tied_groups(base_state, names)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(aliases.get(name, name), []).append(name)
    doubled = [f"{group}" for group in groups.values() if sum(n in deltas for n in group) > 1]
    raise_if_any(doubled, error=TaskArithError, header="the adapter changes several names of one tied weight",
                 fix="Adapters on tied weights (e.g. embed_tokens and lm_head together) are not supported; " + _FIX)
    out: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for name in names:
        group = aliases.get(name, name)
        if group not in shared:
            member = next((n for n in groups[group] if n in deltas), None)
            if member is not None:
                shared[group] = deltas[member]
            elif full:
                shared[group] = torch.zeros(base_state[name].shape, dtype=dtype)
            else:
                continue
        out[name] = shared[group]
    vector = TaskVector(out)
    canonical = [n for n in out if n not in vector.aliases]
    vector._info = replace(vector._info, base_fingerprint=_extract.fingerprint(base_state, canonical))
    return vector
