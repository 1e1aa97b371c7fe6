"""Reading and validating a PEFT LoRA adapter's ``adapter_config.json`` (before any weight is read).

Every option whose effect is not a delta ``s·B@A`` of the base weights is refused,
and every rank, alpha and pattern is checked, all problems reported at once.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from ..errors import TaskArithError, raise_if_any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MAX_CONFIG_BYTES = 10_000_000

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
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes; an adapter config is a few kB")
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise TaskArithError(f"{str(path)!r} is not valid JSON (an adapter config): {str(err)[:200]}") from None
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
    invalid = _invalid_values(config)
    fix = " ".join(([_VALUE_FIX] if invalid else []) + ([_FIX] if problems else []))
    raise_if_any(invalid + problems, error=TaskArithError,
                 header=f"{'invalid' if invalid else 'unsupported'} LoRA adapter config {str(path)!r}", fix=fix)


_VALUE_FIX = (
    "Correct them in adapter_config.json to the values the adapter was trained with: r and rank_pattern values are "
    "positive integers (the rows of lora_A), lora_alpha and alpha_pattern values positive finite numbers, pattern "
    "keys regular expressions matched against the end of module names, modules_to_save a list of module names."
)


def _invalid_values(config: dict) -> list[str]:
    """Every invalid rank, alpha, pattern or modules_to_save: ``s = alpha / r`` must be a finite positive number."""
    problems = []
    checks = (("r", "rank_pattern", _is_rank, "a positive integer rank"),
              ("lora_alpha", "alpha_pattern", _is_alpha, "a positive finite number"))
    for key, pattern_key, valid, expected in checks:
        if not valid(config.get(key, 8)):  # PEFT's default for both is 8
            problems.append(f"{key}={config.get(key, 8)!r}: expected {expected}")
        patterns = config.get(pattern_key)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            problems.append(f"{pattern_key}={patterns!r}: expected an object of module-name patterns, "
                            f"e.g. {{\"q_proj\": {8 if valid is _is_rank else 16}}}")
            continue
        for pattern, value in patterns.items():
            try:
                re.compile(pattern), _pattern_regex(pattern)  # alone too: "q)|(x" only compiles wrapped
            except re.error as err:
                problems.append(f"{pattern_key} key {pattern!r}: not a valid regular expression ({err})")
            if not valid(value):
                problems.append(f"{pattern_key}[{pattern!r}]={value!r}: expected {expected}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        problems.append(f"modules_to_save={saved!r}: expected a list of module names")
    return problems


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: object) -> bool:  # NaN fails both comparisons; a JSON integer past float range fails the second
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= sys.float_info.max


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """The value of the first pattern (in the config's order) that matches the end of ``module``.

    A pattern is a regular expression that must match the whole module name or a
    dotted suffix of it: ``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``
    but not ``"model.layers.0.self_attn.xq_proj"``.
    """
    key = _matching_key(patterns, module)
    return default if key is None else patterns[key]


def _matching_key(patterns: Mapping[str, float], module: str) -> str | None:
    return next((p for p in patterns if _pattern_regex(p).fullmatch(module)), None)


def _pattern_regex(pattern: str) -> re.Pattern:
    """PEFT's ``get_pattern_key`` test (``re.match`` of ``(.*\\.)?(key)$``), for keys that compile alone."""
    return re.compile(rf"(?:.*\.)?(?:{pattern})")


def _rank_and_scale(module: str, config: dict) -> tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
