"""Parity with mergekit, the oracle: the same config merged by ``mergekit-yaml`` and by ``taskarith merge``.

Every case writes a mergekit config over tiny random models (``tests/mergekit_models.py``), merges it
with mergekit (pinned: ``MERGEKIT_VERSION``) and with ``python -m taskarith merge``, and compares the
two output folders tensor by tensor:

- deterministic methods in float32: the same names, shapes and dtypes, and ``torch.equal`` values;
- bfloat16: within a few ULPs; sparsifying methods may differ at a small fraction of entries
  (mergekit computes their deltas in bfloat16, where magnitude ranks tie and round differently);
- random methods (DARE, DELLA): in distribution: the fraction of entries each tensor changes, and
  the mean and spread of the merged deltas.

Each output must also load with ``transformers.AutoModelForCausalLM`` (with no missing or unexpected
weights); its config must match mergekit's (the layer count of a ``slices`` merge above all), and
the files mergekit copies from the base (tokenizer, generation config) must be there, unchanged.

Where mergekit is: ``TASKARITH_MERGEKIT`` (its bin folder), else ``<repo>/.venv-mergekit/bin``
(``.ci/mergekit-venv`` makes it); without one the module is skipped, or fails when ``CI=true`` (or when
``TASKARITH_MERGEKIT`` names a folder without ``mergekit-yaml``).
mergekit runs once per config, all configs in one process of its own interpreter (the function its
``mergekit-yaml`` console script calls, with the same flags; ``TASKARITH_MERGEKIT_BATCH=0`` runs the
console script once per config instead, at ~7 s of start-up each).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_models import ModelFamily, build_family, load_tensors

pytestmark = pytest.mark.mergekit

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_VERSION = "0.1.5"
SEED = 1234  # --random-seed of mergekit, --seed of taskarith
MERGEKIT_FLAGS = ["--device", "cpu", "--no-cuda", "--quiet"]
MERGEKIT_TIMEOUT = 600
TASKARITH_TIMEOUT = 120

# ------------------------------------------------------------------ the models

FAMILIES: dict[str, dict] = {
    "llama": {"arch": "llama", "num_layers": 4, "n_finetuned": 3, "seed": 1},
    "qwen2": {"arch": "qwen2", "num_layers": 3, "n_finetuned": 3, "seed": 2},  # tied embeddings, q/k/v biases
    "gpt2": {"arch": "gpt2", "num_layers": 2, "n_finetuned": 3, "seed": 3},  # Conv1D, tied embeddings
    "mistral": {"arch": "mistral", "num_layers": 2, "n_finetuned": 3, "seed": 4},
    "mistral_bf16": {"arch": "mistral", "num_layers": 2, "n_finetuned": 3, "seed": 5, "dtype": torch.bfloat16},
    # ft0 and ft1 with vocabularies of their own (tests/mergekit_models.py: _vary_vocabularies)
    "llama_vocab": {"arch": "llama", "num_layers": 2, "n_finetuned": 2, "seed": 11, "vocabularies": True},
    "qwen2_vocab": {"arch": "qwen2", "num_layers": 2, "n_finetuned": 2, "seed": 12, "vocabularies": True},
}


def _model(path: Path, **parameters) -> dict:
    entry: dict = {"model": str(path)}
    if parameters:
        entry["parameters"] = parameters
    return entry


# ------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Drop:
    """A random method's sparsification of one model (``finetuned[model]``): DARE keeps each entry with
    probability ``density``; DELLA with ``density - epsilon`` up to ``density + epsilon`` by the rank
    of its magnitude within its row."""

    model: int
    density: float
    epsilon: float = 0.0


@dataclass(frozen=True)
class Case:
    """One mergekit config: ``build(family)`` writes it; ``kind`` says how the outputs compare."""

    name: str
    family: str
    kind: str  # "exact" | "bf16" | "bf16_sparse" | "random"
    build: Callable[[ModelFamily], dict]
    drops: tuple[Drop, ...] = ()  # random: the config's sparsification, model by model


def _task_arithmetic(f: ModelFamily) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(f.base),
            "models": [_model(f.base), _model(f.finetuned[0], weight=1.0), _model(f.finetuned[1], weight=0.5),
                       _model(f.finetuned[2], weight=0.3)],
            "dtype": "float32"}


def _task_arithmetic_normalized(f: ModelFamily) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.7), _model(f.finetuned[1], weight=0.5),
                       _model(f.finetuned[2], weight=-0.2)],
            "parameters": {"normalize": True, "lambda": 0.8}, "dtype": "float32"}


def _task_arithmetic_lambda(f: ModelFamily) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.4), _model(f.finetuned[1], weight=0.6)],
            "parameters": {"normalize": False, "lambda": 1.5}, "dtype": "float32"}


def _task_arithmetic_gradient(f: ModelFamily) -> dict:
    """Weights that vary by layer (a gradient) and by tensor (a filter), and a top-level default."""
    return {"merge_method": "task_arithmetic", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=[1.0, 0.0]),
                       _model(f.finetuned[1], weight=[{"filter": "self_attn", "value": 0.8}, {"value": 0.25}]),
                       _model(f.finetuned[2])],
            "parameters": {"weight": 0.1}, "dtype": "float32"}


def _linear(f: ModelFamily) -> dict:
    return {"merge_method": "linear",
            "models": [_model(f.finetuned[0], weight=0.5), _model(f.finetuned[1], weight=0.3),
                       _model(f.finetuned[2], weight=0.2)],
            "dtype": "float32"}


def _linear_out_bf16(f: ModelFamily) -> dict:
    return {"merge_method": "linear",
            "models": [_model(f.base, weight=0.6), _model(f.finetuned[0], weight=0.6)],
            "parameters": {"normalize": False}, "dtype": "float32", "out_dtype": "bfloat16"}


def _slerp_slices(f: ModelFamily) -> dict:
    """The classic gradient SLERP: attention and MLP on opposite gradients, everything else at 0.5."""
    n = f.num_layers
    return {"merge_method": "slerp", "base_model": str(f.finetuned[0]),
            "slices": [{"sources": [{"model": str(f.finetuned[0]), "layer_range": [0, n]},
                                    {"model": str(f.finetuned[1]), "layer_range": [0, n]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                 {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                                 {"value": 0.5}]},
            "dtype": "float32"}


def _slerp_models(f: ModelFamily) -> dict:
    """A gradient without filters: the embeddings and the norm take ``t`` at 0, its first value."""
    return {"merge_method": "slerp", "base_model": str(f.finetuned[0]),
            "models": [_model(f.finetuned[0]), _model(f.finetuned[1])],
            "parameters": {"t": [0.1, 0.9]}, "dtype": "float32"}


def _ties_gradients(f: ModelFamily) -> dict:
    return {"merge_method": "ties", "base_model": str(f.base),
            "models": [_model(f.base),
                       _model(f.finetuned[0], weight=1.0, density=[1.0, 0.7, 0.1]),
                       _model(f.finetuned[1], weight=[0.0, 0.3, 0.7, 1.0], density=0.5),
                       _model(f.finetuned[2], weight=[{"filter": "mlp", "value": 0.5}, {"value": 0.2}],
                              density=0.4)],
            "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"}


def _ties_simple(f: ModelFamily) -> dict:
    return {"merge_method": "ties", "base_model": str(f.base),
            "models": [_model(m, weight=1.0, density=0.6) for m in f.finetuned],
            "parameters": {"normalize": True}, "dtype": "float32"}


def _ties_unnormalized(f: ModelFamily) -> dict:
    return {"merge_method": "ties", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.7, density=0.5), _model(f.finetuned[1], weight=0.5, density=0.5)],
            "parameters": {"normalize": False}, "dtype": "float32"}


def _dare_ties(f: ModelFamily) -> dict:
    return {"merge_method": "dare_ties", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.6, density=0.5), _model(f.finetuned[1], weight=0.4, density=0.7)],
            "dtype": "float32"}


def _dare_ties_normalized(f: ModelFamily) -> dict:
    return {"merge_method": "dare_ties", "base_model": str(f.base),
            "models": [_model(m) for m in f.finetuned],
            "parameters": {"weight": 1.0, "density": 0.6, "normalize": True}, "dtype": "float32"}


def _dare_linear(f: ModelFamily) -> dict:
    return {"merge_method": "dare_linear", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.5, density=0.5), _model(f.finetuned[1], weight=0.5, density=0.3)],
            "dtype": "float32"}


def _dare_linear_single(f: ModelFamily) -> dict:
    return {"merge_method": "dare_linear", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=1.0, density=0.3)], "dtype": "float32"}


def _breadcrumbs(f: ModelFamily) -> dict:
    return {"merge_method": "breadcrumbs", "base_model": str(f.base),
            "models": [_model(m, weight=0.5, density=0.7, gamma=0.02) for m in f.finetuned],
            "dtype": "float32"}


def _breadcrumbs_ties(f: ModelFamily) -> dict:
    return {"merge_method": "breadcrumbs_ties", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=1.0, density=0.8, gamma=0.05),
                       _model(f.finetuned[1], weight=0.6, density=0.6, gamma=0.01)],
            "parameters": {"normalize": True, "lambda": 0.9}, "dtype": "float32"}


def _della(f: ModelFamily) -> dict:
    return {"merge_method": "della", "base_model": str(f.base),
            "models": [_model(m, weight=1.0) for m in f.finetuned],
            "parameters": {"density": 0.5, "epsilon": 0.1, "lambda": 1.0}, "dtype": "float32"}


def _della_linear(f: ModelFamily) -> dict:
    return {"merge_method": "della_linear", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.5, density=0.6, epsilon=0.15),
                       _model(f.finetuned[1], weight=0.5, density=0.4, epsilon=0.1)],
            "dtype": "float32"}


def _model_stock(f: ModelFamily) -> dict:
    return {"merge_method": "model_stock", "base_model": str(f.base),
            "models": [_model(m) for m in f.finetuned], "dtype": "float32"}


def _model_stock_filter_wise(f: ModelFamily) -> dict:
    return {"merge_method": "model_stock", "base_model": str(f.base),
            "models": [_model(m) for m in f.finetuned[:2]],
            "parameters": {"filter_wise": True}, "dtype": "float32"}


def _sce(f: ModelFamily) -> dict:
    return {"merge_method": "sce", "base_model": str(f.base),
            "models": [_model(m) for m in f.finetuned],
            "parameters": {"select_topk": 0.5}, "dtype": "float32"}


def _nuslerp_base(f: ModelFamily) -> dict:
    return {"merge_method": "nuslerp", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.7), _model(f.finetuned[1], weight=0.3)],
            "dtype": "float32"}


def _nuslerp_row_wise(f: ModelFamily) -> dict:
    return {"merge_method": "nuslerp",
            "models": [_model(f.finetuned[0], weight=0.4), _model(f.finetuned[1], weight=0.6)],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "dtype": "float32"}


def _multislerp(f: ModelFamily) -> dict:
    return {"merge_method": "multislerp", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.5), _model(f.finetuned[1], weight=0.3),
                       _model(f.finetuned[2], weight=0.2)],
            "dtype": "float32"}


def _karcher(f: ModelFamily) -> dict:
    return {"merge_method": "karcher", "models": [_model(m) for m in f.finetuned],
            "parameters": {"max_iter": 20, "tol": 1e-7}, "dtype": "float32"}


def _nearswap(f: ModelFamily) -> dict:
    return {"merge_method": "nearswap", "base_model": str(f.base),
            "models": [_model(f.base), _model(f.finetuned[0])],
            "parameters": {"t": [0.002, 0.01]}, "dtype": "float32"}


def _arcee_fusion(f: ModelFamily) -> dict:
    return {"merge_method": "arcee_fusion", "base_model": str(f.base),
            "models": [_model(f.base), _model(f.finetuned[0])], "dtype": "float32"}


def _ram(f: ModelFamily) -> dict:
    return {"merge_method": "ram", "base_model": str(f.base),
            "models": [_model(m) for m in f.finetuned], "dtype": "float32"}


def _ramplus_tl(f: ModelFamily) -> dict:
    return {"merge_method": "ramplus_tl", "base_model": str(f.base),
            "models": [_model(m) for m in f.finetuned],
            "parameters": {"r": 0.2, "alpha": 0.3}, "dtype": "float32"}


def _frankenmerge(f: ModelFamily) -> dict:
    """Layers 0-2 of ft0, then layers 1-3 of ft1 (their output projections halved): 6 layers from 4."""
    n = f.num_layers
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(f.finetuned[0]), "layer_range": [0, n - 1]}]},
                       {"sources": [{"model": str(f.finetuned[1]), "layer_range": [1, n]}],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                 {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}],
            "dtype": "float32"}


def _slices_own_base(f: ModelFamily) -> dict:
    """SLERP over two slices, each naming its own base_model (ft0's layers, then the base's)."""
    n = f.num_layers
    half = n // 2
    ft0, ft1, base = str(f.finetuned[0]), str(f.finetuned[1]), str(f.base)
    return {"merge_method": "slerp", "base_model": base,
            "slices": [{"sources": [{"model": ft0, "layer_range": [0, half]}, {"model": ft1, "layer_range": [0, half]}],
                        "base_model": ft0, "residual_weight": 0.5},
                       {"sources": [{"model": base, "layer_range": [half, n]}, {"model": ft1, "layer_range": [half, n]}]}],
            "parameters": {"t": [0.2, 0.8]}, "dtype": "float32"}


def _tokenizer_union(f: ModelFamily) -> dict:
    """Every model's tokens; the chat template most models carry (ft0's, the only one)."""
    return {**_task_arithmetic_lambda(f), "tokenizer_source": "union", "chat_template": "auto"}


def _tokenizer_base(f: ModelFamily) -> dict:
    """The base's vocabulary: ft0's extra rows dropped, ft1's re-indexed, the row ft1 lacks from the base."""
    return {**_task_arithmetic_lambda(f), "tokenizer_source": "base"}


def _tokenizer_model(f: ModelFamily) -> dict:
    """ft1's vocabulary (a model path), merged by SLERP with ft0 as the base."""
    return {**_slerp_models(f), "parameters": {"t": 0.3}, "tokenizer_source": str(f.finetuned[1])}


def _tokenizer_block(f: ModelFamily) -> dict:
    """The union, tokens with rows from the config (zero, forced, another token's row), padding, chatml."""
    return {"merge_method": "linear", "base_model": str(f.base),
            "models": [_model(f.finetuned[0], weight=0.6), _model(f.finetuned[1], weight=0.4)],
            "parameters": {"weight": 0.0}, "dtype": "float32", "chat_template": "chatml",
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                "<|im_end|>": {"source": {"kind": "zero"}},
                "common": {"source": str(f.finetuned[1]), "force": True},
                "<|new|>": {"source": {"kind": "model_token", "model": str(f.base), "token": "w5"}},
                "w7": {"source": {"kind": "model_token", "model": str(f.finetuned[0]), "token_id": 9},
                       "force": True}}}}


def _tokenizer_slices_bf16(f: ModelFamily) -> dict:
    """Slices (the embeddings' models are the first slice's, the head's the last's), computed in bfloat16,
    ft0's vocabulary padded to 32 rows more."""
    return {"merge_method": "slerp", "base_model": str(f.finetuned[1]),
            "slices": [{"sources": [{"model": str(f.finetuned[1]), "layer_range": [0, f.num_layers]},
                                    {"model": str(f.base), "layer_range": [0, f.num_layers]}]}],
            "parameters": {"t": 0.25}, "dtype": "bfloat16",
            "tokenizer": {"source": str(f.finetuned[0]), "pad_to_multiple_of": 32}}


def _chat_template(f: ModelFamily) -> dict:
    """Only a chat template: the base's tokenizer saved again with it."""
    return {**_task_arithmetic(f), "chat_template": "chatml"}


def _bf16(build: Callable[[ModelFamily], dict]) -> Callable[[ModelFamily], dict]:
    def config(f: ModelFamily) -> dict:
        return {**build(f), "dtype": "bfloat16"}
    return config


CASES = [
    Case("task_arithmetic", "llama", "exact", _task_arithmetic),
    Case("task_arithmetic_normalize_lambda", "mistral", "exact", _task_arithmetic_normalized),
    Case("task_arithmetic_lambda_tied", "qwen2", "exact", _task_arithmetic_lambda),
    Case("task_arithmetic_gradient_filter", "llama", "exact", _task_arithmetic_gradient),
    Case("linear", "gpt2", "exact", _linear),
    Case("linear_unnormalized_out_bf16", "llama", "exact", _linear_out_bf16),
    Case("slerp_gradient_slices", "llama", "exact", _slerp_slices),
    Case("slerp_gradient_tied", "qwen2", "exact", _slerp_models),
    Case("ties_gradients", "llama", "exact", _ties_gradients),
    Case("ties", "gpt2", "exact", _ties_simple),
    Case("ties_unnormalized", "mistral", "exact", _ties_unnormalized),
    Case("dare_ties", "llama", "random", _dare_ties, (Drop(0, 0.5), Drop(1, 0.7))),
    Case("dare_ties_normalized", "mistral", "random", _dare_ties_normalized, (Drop(0, 0.6), Drop(1, 0.6), Drop(2, 0.6))),
    Case("dare_linear", "llama", "random", _dare_linear, (Drop(0, 0.5), Drop(1, 0.3))),
    Case("dare_linear_single", "gpt2", "random", _dare_linear_single, (Drop(0, 0.3),)),
    Case("breadcrumbs", "llama", "exact", _breadcrumbs),
    Case("breadcrumbs_ties", "mistral", "exact", _breadcrumbs_ties),
    Case("della", "llama", "random", _della, (Drop(0, 0.5, 0.1), Drop(1, 0.5, 0.1), Drop(2, 0.5, 0.1))),
    Case("della_linear", "qwen2", "random", _della_linear, (Drop(0, 0.6, 0.15), Drop(1, 0.4, 0.1))),
    Case("model_stock", "llama", "exact", _model_stock),
    Case("model_stock_filter_wise", "gpt2", "exact", _model_stock_filter_wise),
    Case("sce", "mistral", "exact", _sce),
    Case("nuslerp_base", "llama", "exact", _nuslerp_base),
    Case("nuslerp_row_wise", "qwen2", "exact", _nuslerp_row_wise),
    Case("multislerp", "gpt2", "exact", _multislerp),
    Case("karcher", "mistral", "exact", _karcher),
    Case("nearswap", "llama", "exact", _nearswap),
    Case("arcee_fusion", "qwen2", "exact", _arcee_fusion),
    Case("ram", "llama", "exact", _ram),
    Case("ramplus_tl", "gpt2", "exact", _ramplus_tl),
    Case("passthrough_frankenmerge", "llama", "exact", _frankenmerge),
    Case("slices_own_base", "llama", "exact", _slices_own_base),
    Case("task_arithmetic_bf16", "mistral_bf16", "bf16", _bf16(_task_arithmetic)),
    Case("linear_bf16", "mistral_bf16", "bf16", _bf16(_linear)),
    Case("slerp_bf16", "mistral_bf16", "bf16", _bf16(_slerp_models)),
    Case("ties_bf16", "mistral_bf16", "bf16_sparse", _bf16(_ties_simple)),
    Case("breadcrumbs_ties_bf16", "mistral_bf16", "bf16_sparse", _bf16(_breadcrumbs_ties)),
    Case("tokenizer_union", "llama_vocab", "exact", _tokenizer_union),
    Case("tokenizer_base_tied", "qwen2_vocab", "exact", _tokenizer_base),
    Case("tokenizer_model", "llama_vocab", "exact", _tokenizer_model),
    Case("tokenizer_block_tokens", "llama_vocab", "exact", _tokenizer_block),
    Case("tokenizer_slices_bf16", "llama_vocab", "exact", _tokenizer_slices_bf16),
    Case("chat_template_chatml", "llama", "exact", _chat_template),
]
VOCAB_CASES = [c for c in CASES if c.name.startswith(("tokenizer_", "chat_template"))]
CASE_IDS = [c.name for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)

# ------------------------------------------------------------------ locating and running mergekit


def _locate_mergekit() -> tuple[Path | None, str]:
    """``mergekit-yaml``, or None and why not."""
    configured = os.environ.get("TASKARITH_MERGEKIT")
    if configured:
        exe = Path(configured).expanduser() / "mergekit-yaml"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe, ""
        return None, f"TASKARITH_MERGEKIT={configured} holds no executable mergekit-yaml"
    exe = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe, ""
    return None, (f"mergekit not found: set TASKARITH_MERGEKIT to the bin folder of a mergekit=={MERGEKIT_VERSION} "
                  "install, or run .ci/mergekit-venv to make .venv-mergekit")


def _interpreter(exe: Path) -> Path | None:
    """The Python a console script runs on: its shebang's, else the python beside it."""
    try:
        first = exe.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        first = ""
    if first.startswith("#!"):
        candidate = Path(first[2:].strip().split()[0]) if first[2:].strip() else None
        if candidate is not None and candidate.name.startswith("python") and candidate.is_file():
            return candidate
    beside = exe.parent / "python"
    return beside if beside.is_file() else None


# Runs in mergekit's interpreter: the click command behind ``mergekit-yaml``, once per job, in one process
# (mergekit's start-up is ~7 s: imports). Each merge re-seeds from --random-seed, as a fresh CLI would.
_DRIVER = r"""
import json, sys, time, traceback
from importlib.metadata import version
from mergekit.scripts.run_yaml import main

jobs = json.load(open(sys.argv[1]))
results = {"version": version("mergekit"), "jobs": {}}
for job in jobs:
    start = time.perf_counter()
    try:
        main.main(args=[job["config"], job["out"], *job["flags"]], prog_name="mergekit-yaml", standalone_mode=False)
        outcome = {"ok": True}
    except BaseException:
        outcome = {"ok": False, "error": traceback.format_exc()}
    outcome["seconds"] = time.perf_counter() - start
    results["jobs"][job["name"]] = outcome
    json.dump(results, open(sys.argv[2], "w"), indent=1)
"""


def _run_batch(python: Path, jobs: list[dict], work: Path) -> dict:
    (work / "driver.py").write_text(_DRIVER)
    (work / "jobs.json").write_text(json.dumps(jobs))
    results_file = work / "results.json"
    proc = subprocess.run([str(python), str(work / "driver.py"), str(work / "jobs.json"), str(results_file)],
                          capture_output=True, text=True, timeout=MERGEKIT_TIMEOUT, cwd=work, check=False)
    if not results_file.exists():
        pytest.fail(f"mergekit's driver wrote no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(results_file.read_text())
    for job in jobs:  # a crash part-way: the rest did not run
        results["jobs"].setdefault(job["name"], {"ok": False, "seconds": 0.0,
                                                 "error": f"not run (driver exit {proc.returncode}):\n"
                                                          f"{proc.stderr[-4000:]}"})
    return results


def _run_each(exe: Path, jobs: list[dict], work: Path) -> dict:
    results: dict = {"version": None, "jobs": {}}
    python = _interpreter(exe)
    if python is not None:
        probe = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('mergekit'))"],
                               capture_output=True, text=True, timeout=120, check=False)
        results["version"] = probe.stdout.strip() or None
    for job in jobs:
        start = time.perf_counter()
        proc = subprocess.run([str(exe), job["config"], job["out"], *job["flags"]], capture_output=True, text=True,
                              timeout=MERGEKIT_TIMEOUT, cwd=work, check=False)
        results["jobs"][job["name"]] = {"ok": proc.returncode == 0, "seconds": time.perf_counter() - start,
                                        "error": proc.stderr[-4000:]}
    return results


@dataclass
class Oracle:
    version: str | None
    root: Path
    families: dict[str, ModelFamily]
    configs: dict[str, Path]
    outputs: dict[str, Path]
    results: dict[str, dict]
    taskarith: dict[str, tuple[Path, subprocess.CompletedProcess, float]] = field(default_factory=dict)


def _selected(request) -> list[Case]:
    """The cases the session's selected tests ask for (all of them where none does: the version test alone)."""
    wanted = {item.callspec.params["case"].name for item in request.session.items
              if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)}
    return [c for c in CASES if c.name in wanted] or CASES


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, request) -> Oracle:
    exe, reason = _locate_mergekit()
    if exe is None:
        if os.environ.get("CI") == "true" or os.environ.get("TASKARITH_MERGEKIT"):  # required, or asked for
            pytest.fail(f"the mergekit oracle is required (CI=true or TASKARITH_MERGEKIT set): {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("mergekit_parity")
    cases = _selected(request)  # mergekit runs only the selected cases (-k): ~1 s each
    families = {name: build_family(root / "models" / name, **spec) for name, spec in FAMILIES.items()
                if any(c.family == name for c in cases)}
    configs, outputs, jobs = {}, {}, []
    for case in cases:
        config = root / "configs" / f"{case.name}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(case.build(families[case.family]), sort_keys=False))
        configs[case.name] = config
        outputs[case.name] = root / "mergekit" / case.name
        jobs.append({"name": case.name, "config": str(config), "out": str(outputs[case.name]),
                     "flags": [*MERGEKIT_FLAGS, "--random-seed", str(SEED)]})
    python = _interpreter(exe)
    batch = os.environ.get("TASKARITH_MERGEKIT_BATCH", "1") != "0" and python is not None
    start = time.perf_counter()
    results = _run_batch(python, jobs, root) if batch else _run_each(exe, jobs, root)
    total = time.perf_counter() - start
    per = {name: round(r["seconds"], 2) for name, r in results["jobs"].items()}
    print(f"\nmergekit {results['version']} ({exe}): {len(jobs)} configs in {total:.1f}s, per config: {per}")
    return Oracle(results["version"], root, families, configs, outputs, results["jobs"])


def _mergekit_output(oracle: Oracle, case: Case) -> Path:
    result = oracle.results[case.name]
    if not result["ok"]:
        pytest.fail(f"mergekit failed on {case.name} (a config the oracle rejects is a bug in this suite):\n"
                    f"{result['error']}")
    return oracle.outputs[case.name]


def _taskarith_output(oracle: Oracle, case: Case) -> Path:
    """``taskarith merge CONFIG -o OUT`` (once per case, in a subprocess); fails with its error."""
    if case.name not in oracle.taskarith:
        out = oracle.root / "taskarith" / case.name
        out.parent.mkdir(parents=True, exist_ok=True)
        # This checkout's taskarith, installed or not (an explicit PYTHONPATH still comes first).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "taskarith", "merge", str(oracle.configs[case.name]),
                               "-o", str(out), "--seed", str(SEED)], capture_output=True, text=True,
                              timeout=TASKARITH_TIMEOUT, cwd=oracle.root, env=env, check=False)
        oracle.taskarith[case.name] = (out, proc, time.perf_counter() - start)
    out, proc, _ = oracle.taskarith[case.name]
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip() or "(no output)")[-4000:]
        last = message.splitlines()[-1]  # the error line, or a traceback's exception
        pytest.fail(f"taskarith merge failed on {case.name} (exit {proc.returncode}): {last}\n{message}", pytrace=False)
    return out


# ------------------------------------------------------------------ comparisons


def _same_layout(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, f"tensor names differ: missing {missing}, unexpected {extra}"
    for name, e in expected.items():
        a = actual[name]
        assert (tuple(a.shape), a.dtype) == (tuple(e.shape), e.dtype), \
            f"{name}: taskarith wrote {tuple(a.shape)} {a.dtype}, mergekit {tuple(e.shape)} {e.dtype}"


def _mismatch(name: str, e: torch.Tensor, a: torch.Tensor) -> str:
    diff = (e.double() - a.double()).abs()
    diff = torch.where(torch.isnan(e.double()) & torch.isnan(a.double()), 0.0, diff.nan_to_num(math.inf))
    return (f"{name}: max abs diff {diff.max().item():.3g}, {(diff > 0).sum().item()}/{diff.numel()} entries differ "
            f"(|mergekit| max {e.double().abs().max().item():.3g})")


def _assert_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    bad = [name for name in sorted(expected) if not torch.equal(expected[name], actual[name])]
    if bad:
        pytest.fail(f"{len(bad)}/{len(expected)} tensors differ from mergekit's; first: "
                    f"{_mismatch(bad[0], expected[bad[0]], actual[bad[0]])}; all: {bad[:12]}", pytrace=False)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at ``|x|`` (its smallest normal spacing at zero)."""
    finfo = torch.finfo(dtype)
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    _, exponent = torch.frexp(x.double().abs().clamp(min=finfo.tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - mantissa_bits)


def _assert_close_ulps(expected, actual, operands: list[dict], *, ulps: float, max_fraction: float,
                       min_count: int = 2) -> None:
    """Each tensor within ``ulps`` spacings of its dtype at the magnitude of the entry's largest operand
    (the inputs' entries and both results: mergekit computes deltas in bfloat16, whose rounding is
    relative to them, not to a result that may be near zero), except at a fraction ``max_fraction`` of
    its entries (at least ``min_count``)."""
    failures = []
    for name in sorted(expected):
        e, a = expected[name], actual[name]
        if not e.is_floating_point():
            if not torch.equal(e, a):
                failures.append(f"{name}: integer tensors differ")
            continue
        scale = torch.maximum(e.double().abs(), a.double().abs())
        for inputs in operands:
            if name in inputs and inputs[name].shape == e.shape:
                scale = torch.maximum(scale, inputs[name].double().abs())
        off = (e.double() - a.double()).abs() > ulps * _ulp(scale, e.dtype)
        allowed = max(min_count, int(max_fraction * e.numel())) if max_fraction > 0 else 0
        if off.sum().item() > allowed:
            failures.append(f"{_mismatch(name, e, a)}; {off.sum().item()} beyond {ulps} ULPs, {allowed} allowed")
    if failures:
        pytest.fail(f"{len(failures)}/{len(expected)} tensors differ beyond tolerance; first: {failures[0]}; "
                    f"all: {[f.split(':')[0] for f in failures][:12]}", pytrace=False)


def _keep_probability(delta: torch.Tensor, drop: Drop) -> torch.Tensor:
    """The probability that a random method keeps each entry of ``delta`` (0 where it is 0)."""
    if drop.epsilon == 0:
        p = torch.full_like(delta, drop.density)
    else:  # DELLA: linear in the rank of |delta| within the row (the last axis; a vector is one row)
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
        n = rows.shape[-1]
        rank = rows.abs().argsort(dim=-1).argsort(dim=-1).double()
        p = (drop.density - drop.epsilon + 2 * drop.epsilon * rank / max(n - 1, 1)).reshape(delta.shape)
    return torch.where(delta != 0, p, 0.0)


def _assert_same_distribution(case: Case, oracle: Oracle, expected, actual) -> None:
    """Random methods. The entries a merge changes: an entry changes where some model keeps a nonzero
    delta (sign election keeps the kept deltas of the elected sign, and there is one), so each tensor
    changes a fraction 1 - prod_i (1 - p_i) of its entries, p_i the probability that model i keeps the
    entry: both outputs must be within 5 sigma of it, per tensor and over the model. The merged
    deltas: their spread per tensor and over the model, and their mean, close to mergekit's."""
    family = oracle.families[case.family]
    base = load_tensors(family.base)
    sources = {d.model: load_tensors(family.finetuned[d.model]) for d in case.drops}
    failures = []
    totals = {"mergekit": [0.0, 0.0], "taskarith": [0.0, 0.0]}  # changed entries, expected
    variance, count = 0.0, 0
    all_e, all_a = [], []
    for name in sorted(expected):
        b = base[name].double()
        untouched = torch.ones_like(b)
        for drop in case.drops:
            untouched = untouched * (1 - _keep_probability(sources[drop.model][name].double() - b, drop))
        p = 1 - untouched
        n = b.numel()
        mean_p, sigma = p.mean().item(), math.sqrt((p * (1 - p)).sum().item()) / n
        variance += (p * (1 - p)).sum().item()
        count += n
        for who, merged in (("mergekit", expected[name]), ("taskarith", actual[name])):
            changed = (merged.double() != b).double().sum().item()
            totals[who][0] += changed
            totals[who][1] += p.sum().item()
            if abs(changed / n - mean_p) > 5 * sigma + 0.005:
                failures.append(f"{name}: {who} changes {changed / n:.3f} of the entries, expected {mean_p:.3f} "
                                f"± {sigma:.3f}")
        de, da = expected[name].double() - b, actual[name].double() - b
        if n >= 1024:
            se, sa = de.std().item(), da.std().item()
            if not (0.75 * se <= sa <= 1.25 * se):
                failures.append(f"{name}: std of the merged delta {sa:.3g}, mergekit's {se:.3g}")
        all_e.append(de.flatten())
        all_a.append(da.flatten())
    sigma = math.sqrt(variance) / count
    for who, (changed, wanted) in totals.items():
        if abs(changed - wanted) / count > 5 * sigma + 0.002:
            failures.append(f"model: {who} changes {changed / count:.4f} of the entries, expected {wanted / count:.4f} "
                            f"± {sigma:.4f}")
    de, da = torch.cat(all_e), torch.cat(all_a)
    se, sa = de.std().item(), da.std().item()
    if not (0.9 * se <= sa <= 1.1 * se):
        failures.append(f"model: std of the merged delta {sa:.4g}, mergekit's {se:.4g}")
    if abs(da.mean().item() - de.mean().item()) > 0.05 * se:
        failures.append(f"model: mean of the merged delta {da.mean().item():.3g}, mergekit's {de.mean().item():.3g}")
    if failures:
        pytest.fail(f"{len(failures)} distribution checks failed; first: {failures[0]}; all: {failures[:8]}",
                    pytrace=False)


# ------------------------------------------------------------------ the tests


def test_oracle_version(oracle):
    assert oracle.version == MERGEKIT_VERSION, (
        f"the oracle is mergekit {oracle.version}; this suite pins {MERGEKIT_VERSION} (its semantics move between "
        "versions: rescaling, sparsification): recreate .venv-mergekit with .ci/mergekit-venv")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tensors_match(oracle, case):
    expected = load_tensors(_mergekit_output(oracle, case))
    actual = load_tensors(_taskarith_output(oracle, case))
    _same_layout(expected, actual)
    if case.kind == "exact":
        _assert_equal(expected, actual)
    elif case.kind in ("bf16", "bf16_sparse"):  # sparsifying: ranks of bfloat16 deltas tie and round apart
        operands = [load_tensors(m) for m in oracle.families[case.family].models]
        _assert_close_ulps(expected, actual, operands, ulps=4, max_fraction=0.03 if case.kind == "bf16_sparse" else 0)
    elif case.kind == "random":
        _assert_same_distribution(case, oracle, expected, actual)
    else:
        raise AssertionError(case.kind)


def _config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loads_in_transformers(oracle, case):
    """The output loads with every weight in place, with mergekit's layer count, and runs."""
    transformers = pytest.importorskip("transformers")
    reference = _mergekit_output(oracle, case)
    out = _taskarith_output(oracle, case)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"loading {case.name}: {problems}"
    layers_mk = transformers.AutoConfig.from_pretrained(reference).num_hidden_layers
    assert model.config.num_hidden_layers == layers_mk, \
        f"taskarith's config says {model.config.num_hidden_layers} layers, mergekit's {layers_mk}"
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    assert logits.shape == (1, 8, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_config_and_files_match(oracle, case):
    """config.json as mergekit writes it (the base's, or the first model's, with the layer count of the
    slices and ``dtype`` set to the config's dtype/out_dtype); the files mergekit copies from that model
    (tokenizer, generation config) byte for byte, or the tokenizer it builds (``tokenizer_source``,
    ``tokenizer:``, ``chat_template``) as it saves it; a chat template mergekit names (``chatml``) is
    taskarith's own text: it must render every conversation alike. mergekit's own README.md and
    mergekit_config.yml are not required."""
    reference = _mergekit_output(oracle, case)
    out = _taskarith_output(oracle, case)
    expected, actual = _config(reference), _config(out)
    diff = {k: (expected.get(k), actual.get(k)) for k in set(expected) | set(actual) if expected.get(k) != actual.get(k)}
    assert not diff, f"config.json differs from mergekit's (key: (mergekit, taskarith)): {diff}"
    own = {"config.json", "README.md", "mergekit_config.yml", "model.safetensors.index.json"}
    copied = sorted(p.name for p in reference.iterdir()
                    if p.is_file() and p.name not in own and not p.name.endswith(".safetensors"))
    for name in copied:
        assert (out / name).is_file(), f"taskarith did not write {name} (mergekit copies it: {copied})"
        if name == "chat_template.jinja":
            _assert_same_rendering((reference / name).read_text(), (out / name).read_text())
            continue
        assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs from mergekit's"


CONVERSATIONS = [
    [{"role": "user", "content": " hello there "}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w5 w7"},
     {"role": "assistant", "content": "zeta\ncommon "}, {"role": "user", "content": "bye"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
]


def _assert_same_rendering(expected: str, actual: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            kwargs = {"conversations": [conversation], "add_generation_prompt": prompt, "bos_token": "<s>",
                      "eos_token": "</s>"}
            e = render_jinja_template(chat_template=expected, **kwargs)[0]
            a = render_jinja_template(chat_template=actual, **kwargs)[0]
            assert a == e, f"the chat template renders {a!r}, mergekit's {e!r} ({conversation}, {prompt=})"


@pytest.mark.parametrize("case", VOCAB_CASES, ids=[c.name for c in VOCAB_CASES])
def test_tokenizer_matches(oracle, case):
    """The output's tokenizer, loaded with Transformers: mergekit's vocabulary (ids included), added and
    special tokens, the same encodings and the same chat template; ``vocab_size`` covers it."""
    transformers = pytest.importorskip("transformers")
    expected = transformers.AutoTokenizer.from_pretrained(_mergekit_output(oracle, case))
    actual = transformers.AutoTokenizer.from_pretrained(_taskarith_output(oracle, case))
    assert actual.get_vocab() == expected.get_vocab()
    assert {i: str(t) for i, t in actual.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in expected.added_tokens_decoder.items()}
    assert actual.all_special_tokens == expected.all_special_tokens
    text = "w5 zeta <|im_start|> common w7 <|new|> w63 <|im_end|> unseen"
    assert actual(text)["input_ids"] == expected(text)["input_ids"]
    if expected.chat_template is not None or actual.chat_template is not None:
        _assert_same_rendering(expected.chat_template, actual.chat_template)
    config = transformers.AutoConfig.from_pretrained(_taskarith_output(oracle, case))
    assert config.vocab_size >= len(actual.get_vocab())


def test_families_are_deterministic(tmp_path):
    one = build_family(tmp_path / "a", "qwen2", n_finetuned=2, seed=7)
    two = build_family(tmp_path / "b", "qwen2", n_finetuned=2, seed=7)
    for x, y in zip(one.models, two.models):
        tx, ty = load_tensors(x), load_tensors(y)
        assert tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)
    base, ft0, ft1 = (load_tensors(p) for p in one.models)
    delta0 = {k: ft0[k] - base[k] for k in base}
    delta1 = {k: ft1[k] - base[k] for k in base}
    opposed = sum(((d0 != 0) & (d0 == -delta1[k])).sum().item() for k, d0 in delta0.items())
    conflicts = sum(((d0 * delta1[k]) < 0).sum().item() for k, d0 in delta0.items())
    zeros = sum((d0 == 0).sum().item() for d0 in delta0.values())
    assert opposed > 0 and conflicts > 0 and zeros > 0  # exact sign ties, sign conflicts, unchanged entries
