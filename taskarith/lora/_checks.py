"""Checks of a LoRA adapter before it becomes a task vector: ranks against the config, shapes against
the base, and the ``modules_to_save`` copies a merge would untie."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import KeyMismatchError, ShapeMismatchError, TaskArithError, format_names, raise_if_any
from ..io import Source
from ._config import _matching_key


def _check_ranks(factors, config, path: Path) -> None:
    """Each module's factors must have the rank the config gives it: the scaling ``alpha / r`` depends on it."""
    problems = []
    for module, parts in factors.items():
        key = _matching_key(config.get("rank_pattern") or {}, module)
        r = config.get("r", 8) if key is None else config["rank_pattern"][key]
        a, b = (parts["embedding_A"], parts["embedding_B"]) if "embedding_A" in parts else (parts["A.weight"], parts["B.weight"])
        if a.shape[0] != r or b.shape[1] != r:
            source = "" if key is None else f" (rank_pattern[{key!r}])"
            problems.append(f"{module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} have rank {a.shape[0]} and "
                            f"{b.shape[1]}, the config says r={r}{source}")
        elif "B.bias" in parts and tuple(parts["B.bias"].shape) != (b.shape[0],):
            bias = tuple(parts["B.bias"].shape)
            problems.append(f"{module!r}: lora_B's bias has shape {bias}, lora_B {tuple(b.shape)}")
    raise_if_any(problems, error=TaskArithError, header=f"{str(path)!r} does not match the saved factors",
                 fix="Check r and rank_pattern there (a module's rank is its first matching rank_pattern value, else "
                     "r): the scaling s = alpha / r depends on them.")


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


def _trained_copies(saved: Mapping[str, torch.Tensor], layer_weights: set[str], config: dict) -> set[str]:
    """Saved weights of ``modules_to_save`` modules (those whose name ends with an entry, as PEFT matches them).

    PEFT trains such a module as a deep copy, so merging unties it from the
    weights the base ties to it, unless ``ensure_weight_tying`` ties the copies.
    """
    targets = config.get("modules_to_save") or []
    if config.get("ensure_weight_tying"):
        return set()
    return {n for n in saved if n not in layer_weights
            and any(n.rsplit(".", k)[0].endswith(t) for k in range(1, n.count(".") + 1) for t in targets)}


def _check_untie_fits(copies: set[str], saved: Mapping[str, torch.Tensor], base: Source | None) -> None:
    """Refuse to untie a word embedding when ``base`` is a folder whose config.json ties the word embeddings.

    Such a folder stores one tensor for both names, and transformers ties them
    again on loading, so no vector applied to it gives PEFT's untied merge.
    """
    path = Path(base) / "config.json" if isinstance(base, (str, os.PathLike)) and copies else None
    try:
        config = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return
    text = (config.get("text_config") or config) if isinstance(config, dict) else None  # multimodal: text_config
    if not isinstance(text, dict) or not text.get("tie_word_embeddings", True):  # absent: the old default, True
        return
    vocab = text.get("vocab_size")
    hit = [n for n in copies if saved[n].dim() == 2 and (not isinstance(vocab, int) or vocab in saved[n].shape)]
    if hit:
        raise TaskArithError(
            f"the adapter's modules_to_save trains its own copy of {format_names(hit)}, and the base folder "
            f"{str(base)!r} ties the word embeddings (config.json: tie_word_embeddings=true). PEFT's merge_and_unload "
            "unties them (the copy's weight under its name, the base weight under the other), which a folder with "
            "tied embeddings cannot hold. Pass the loaded model instead: model = "
            "AutoModelForCausalLM.from_pretrained(folder); merged = from_lora(adapter, base=model).apply_to(model); "
            "and load or save the result with tie_word_embeddings=False."
        )
