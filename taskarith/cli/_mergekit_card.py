"""What a merge from a mergekit config leaves beside the weights: a model card (``README.md``) and
the config as run (``mergekit_config.yml``), as mergekit does."""

from __future__ import annotations

from .. import merging
from ._document import Document

__all__ = ["files"]


def files(doc: Document, data: dict, method: str, registered: str) -> dict[str, str]:
    """``README.md`` and ``mergekit_config.yml`` for the output folder."""
    models = sorted({str(m) for m in _models(data)})
    base = data.get("base_model")
    paper = merging.methods()[registered].paper
    lines = ["---", *(["base_model:", *(f"- {m}" for m in models)] if models else []),
             "library_name: transformers", "tags:", "- mergekit", "- merge", "- taskarith", "---",
             f"# {data.get('name') or 'merged model'}", "",
             (f"This model was merged with taskarith from a mergekit configuration, with the `{method}` method "
              f"({paper})."), ""]
    if isinstance(base, str):
        lines += [f"The base model was `{base}`.", ""]
    lines += ["## Models merged", "", *(f"* `{m}`" for m in models if m != base), "",
              "## Configuration", "", "```yaml", doc.text.rstrip(), "```", ""]
    return {"README.md": "\n".join(lines), "mergekit_config.yml": doc.text.rstrip() + "\n"}


def _models(data: dict) -> list:
    found = []
    for entry in data.get("models") or []:
        found.append(entry.get("model") if isinstance(entry, dict) else entry)
    for sl in data.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            found.append(src.get("model") if isinstance(src, dict) else src)
    if data.get("base_model") is not None:
        found.append(data["base_model"])
    return [m for m in found if isinstance(m, str)]
