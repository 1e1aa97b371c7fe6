"""Griffe extension: adapt taskarith's docstrings to the API reference.

Runs on every docstring of the package before it is parsed:

* Sphinx roles (``:meth:`dot```, ``:func:`~taskarith.merge```, ...) become
  optional cross-references to the object they name, resolved from the
  docstring's scope (class, module, package); a name that does not resolve
  stays plain code.
* ``Example:`` headings become ``Examples:``, which griffe parses into
  highlighted ``>>>`` sessions (Google style accepts both spellings).
* A reST literal marker (``text::`` before an indented block) becomes ``text:``;
  the indented block is a code block in Markdown too.
* Doctest-only details are hidden from readers: ``# doctest:`` directives and
  ``pytest.importorskip`` lines.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:meth|func|class|attr|data|mod|exc|obj):`(~?)([\w.]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_DIRECTIVE = re.compile(r"[ \t]+# doctest:[^\n]*")
_SKIP = re.compile(r"^[ \t]*>>> import pytest; _ = pytest\.importorskip\([^\n]*\n", re.MULTILINE)
_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)  # reST "text::" before an indented block


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class Docstrings(griffe.Extension):
    """Rewrite the package's docstrings once the whole package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, pkg, obj.docstring.value)

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs) -> None:  # older griffe releases
        self.on_package(pkg=pkg, **kwargs)


def _rewrite(obj, pkg: griffe.Module, text: str) -> str:
    text = _ROLE.sub(lambda m: _link(obj, pkg, m), text)
    text = _LITERAL.sub(":", _EXAMPLE.sub(r"\1Examples:", text))
    return _SKIP.sub("", _DIRECTIVE.sub("", text))


def _resolve(obj, pkg: griffe.Module, target: str) -> str | None:
    scopes = []
    while obj is not None:
        scopes.append(obj.path)
        obj = obj.parent
    for path in [target] + [f"{scope}.{target}" for scope in scopes]:
        if not path.startswith(pkg.path + "."):
            continue
        try:
            return pkg[path[len(pkg.path) + 1:]].path
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
    return None


def _link(obj, pkg: griffe.Module, match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    title = target.rsplit(".", 1)[-1] if short else target
    path = _resolve(obj, pkg, target)
    if path is None:
        return f"`{title}`"
    return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'
