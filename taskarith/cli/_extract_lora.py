"""``taskarith extract-lora``: a model pair -> a PEFT LoRA adapter approximating FINETUNED − BASE."""

from __future__ import annotations

import json
import os

from ..errors import TaskArithError
from ..io import load_state_dict
from ..lora._extraction import check_options, extract, layer_kinds
from ..vector import TaskVector
from ._output import check_output, log
from ._plan import DTYPES

__all__ = ["run"]

_RANDOMIZED = {"auto": None, "exact": False, "randomized": True}


def run(args, parser) -> None:
    rank = _rank(args.rank)
    options = {"target": args.target, "rest": args.rest, "randomized": _RANDOMIZED[args.svd], "niter": args.niter,
               "seed": args.seed, "dtype": DTYPES.get(args.dtype)}
    check_options(rank, **options)
    missing = [p for p in (args.base, args.finetuned) if not os.path.exists(p)]
    if missing:
        raise TaskArithError(f"no such model file or folder: {', '.join(map(repr, missing))}")
    out = check_output(args, args.base, args.finetuned, folder=True)
    kinds = layer_kinds(args.base)  # from the folder's config.json: no weight is read
    state = load_state_dict(args.base, allow_pickle=args.allow_pickle)
    vector = TaskVector.from_models(state, args.finetuned, allow_pickle=args.allow_pickle)
    extraction = extract(vector, rank, state=state, kinds=kinds, base_name_or_path=os.fspath(args.base), **options)
    extraction.save(out, overwrite=True)  # checked above
    if args.json:
        print(json.dumps({"adapter": str(out), **extraction.as_dict()}, indent=1))
    log(f"wrote {out} ({extraction.summary()})")


def _rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank <= 0:
        raise TaskArithError(f"--rank must be a positive integer (the LoRA rank r), got {text!r}")
    return rank
