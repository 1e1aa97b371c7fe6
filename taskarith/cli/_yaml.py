"""Reading a merge config's text safely: YAML or JSON, with the line of every key.

A config is a few kilobytes written by hand or by a tool, so anything far outside that is refused
with a message instead of being parsed: files over :data:`MAX_BYTES`, nesting deeper than
:data:`MAX_DEPTH`, documents that expand to more than :data:`MAX_NODES` values (YAML aliases
repeat what they refer to, so a few lines can stand for billions of values), and integers beyond
64 bits (kept as :class:`OutOfRange` so that no later ``float()`` or ``repr()`` fails on them).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from ..errors import TaskArithError

try:
    import yaml
except ImportError:  # JSON configs still work without PyYAML (without line numbers)
    yaml = None

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "OutOfRange", "load", "load_all", "read"]

MAX_BYTES = 256 << 10  # a config with a thousand models and long paths is ~100 KB
MAX_DEPTH = 64
MAX_NODES = 100_000
_MAX_INT = 1 << 64
_MAX_INT_CHARS = 100  # longer integer literals are out of range (and slow to convert: base 60, >4300 digits)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_FIX = "a merge config is a short YAML or JSON text file; see docs/cli.md"


class OutOfRange:
    """An integer literal beyond ±2**64, kept as text: no config value needs one."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        digits = self.text.lstrip("+-")
        shown = digits if len(digits) <= 12 else f"{digits[:6]}…{digits[-3:]}"
        return f"an integer of {len(digits)} digits ({self.text[0] if self.text[0] in '+-' else ''}{shown})"


def read(path: Path) -> str:
    """The text of the config file at ``path``, refusing files too large or not text."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise TaskArithError(f"cannot read the config {str(path)!r}: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        size = f"{size:,} bytes" if size > MAX_BYTES else "endless (a device or a pipe)"
        raise TaskArithError(f"{path}: the config is {size}, over the {MAX_BYTES:,}-byte limit: {_FIX} "
                             "(is it a checkpoint?)")
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise TaskArithError(f"{path}: line {line}: byte 0x{raw[err.start]:02x} is not {encoding.upper()} text: "
                             f"{_FIX} (save it as UTF-8; is it a checkpoint?)") from None
    return text


def load(text: str, name: str) -> tuple[object, dict[tuple, int], list[tuple]]:
    """Parse a config: its data, the line of every key and list item, and the paths of duplicate keys.

    Valid JSON is read as JSON (``1e-3`` is a number there, text in YAML 1.1); YAML still supplies
    its line numbers. Raises :class:`TaskArithError` for anything unreadable or beyond the limits.
    """
    if len(text) > MAX_BYTES:
        raise TaskArithError(f"{name}: the config is {len(text):,} characters, over the {MAX_BYTES:,} limit: {_FIX}")
    text = text.removeprefix("\ufeff")
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise TaskArithError(f"{name}: line {line}: a NUL character: this is a binary file, not YAML or JSON "
                             "(is it a checkpoint?); " + _FIX)
    data, json_error = _json(text, name)
    if yaml is None:
        if json_error is None:
            return data, {}, []
        if not name.endswith(".json"):
            raise TaskArithError("reading YAML configs needs PyYAML (pip install pyyaml), or write the config as JSON")
        raise TaskArithError(f"{name}: line {json_error.lineno}: not valid JSON: {json_error.msg}")
    # JSON forbids raw tabs inside strings, so outside them they are plain spaces, which YAML needs
    try:
        loader = _Loader(text.replace("\t", " ") if json_error is None else text, name)
        node = loader.get_single_node()
        lines, duplicates = {}, []
        if node is not None:  # before constructing, which expands YAML merge keys ('<<: *base') in place
            _walk(node, (), lines, duplicates)
            if json_error is not None:
                data = loader.construct_document(node)
        elif json_error is not None:
            data = None
    except yaml.YAMLError as err:
        if json_error is not None:
            raise TaskArithError(f"{name}: {_yaml_problem(err, text)}") from None
        lines, duplicates = {}, []  # valid JSON that PyYAML reads otherwise (a key over 1024 characters)
    return data, lines, duplicates


def load_all(text: str, name: str) -> list[tuple[object, dict[tuple, int], list[tuple], str]]:
    """Every document of a YAML stream (``---`` between them; mergekit-multi's configs): per document its
    data, the line of every key (in the whole file), the paths of duplicate keys, and its own text.

    The limits of :func:`load` hold for the whole file: its size, and the values of all documents together.
    JSON text is one document.
    """
    if len(text) > MAX_BYTES or "\0" in text or yaml is None:
        return [(*load(text, name), text)]
    text = text.removeprefix("\ufeff")
    if _json(text, name)[1] is None:
        return [(*load(text, name), text)]
    documents = []
    try:
        loader = _Loader(text, name)
        while loader.check_node():
            node = loader.get_node()
            lines, duplicates = {}, []
            data, own = None, ""
            if node is not None:
                _walk(node, (), lines, duplicates)
                data = loader.construct_document(node)
                own = text[node.start_mark.index:node.end_mark.index]
            documents.append((data, lines, duplicates, own))
    except yaml.YAMLError as err:
        raise TaskArithError(f"{name}: {_yaml_problem(err, text)}") from None
    return documents or [(None, {}, [], text)]


def _json(text: str, name: str):
    try:
        data = json.loads(text, parse_int=_integer)
    except json.JSONDecodeError as err:
        return None, err
    except RecursionError:
        raise TaskArithError(_too_deep(name, None)) from None
    stack, count = [(data, 1)], 0
    while stack:  # JSON has no aliases: bound its depth and size as the YAML loader does
        value, level = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise TaskArithError(_too_many(name, None))
        if isinstance(value, (dict, list)):
            if level > MAX_DEPTH:
                raise TaskArithError(_too_deep(name, None))
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return data, None


def _integer(text: str):
    if len(text) > _MAX_INT_CHARS:
        return OutOfRange(text)
    value = int(text)
    return value if -_MAX_INT < value < _MAX_INT else OutOfRange(text)


def _too_deep(name: str, line: int | None) -> str:
    where = f"line {line}: " if line else ""
    return f"{name}: {where}nested more than {MAX_DEPTH} levels deep; {_FIX}"


def _too_many(name: str, line: int | None, aliases: bool = False) -> str:
    where = f"line {line}: " if line else ""
    why = " (each YAML alias '*name' repeats all it refers to)" if aliases else ""
    return f"{name}: {where}the config holds more than {MAX_NODES:,} values{why}; {_FIX}"


def _yaml_problem(err, text: str) -> str:
    if isinstance(err, yaml.reader.ReaderError):  # a control character
        line = text[:err.position].count("\n") + 1
        return f"line {line}: the control character U+{err.character:04X} is not allowed in YAML; {_FIX}"
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    hint = " (indent YAML with spaces, not tabs)" if "'\\t'" in problem else ""
    return f"{where}not valid YAML: {problem}{hint}"


def _walk(node, path: tuple, lines: dict, duplicates: list) -> None:
    """Record the line of every key and item under ``node`` (at most MAX_NODES, MAX_DEPTH deep)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            lines[path + (key,)] = key_node.start_mark.line + 1
            if key in seen:
                duplicates.append(path + (key,))
            seen.add(key)
            _walk(value, path + (key,), lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk(item, path + (i,), lines, duplicates)


if yaml is not None:

    class _Loader(yaml.SafeLoader):
        """PyYAML's safe loader, counting while it composes: the expanded size (an alias counts as
        everything it refers to) and the depth, refused past the limits before anything is built."""

        def __init__(self, text: str, name: str):
            super().__init__(text)
            self.config_name, self.level, self.deepest, self.nodes, self.aliases = name, 0, 0, 0, False

        def compose_node(self, parent, index):
            mark = self.peek_event().start_mark
            level = self.level + 1
            if self.check_event(yaml.AliasEvent):
                node = super().compose_node(parent, index)
                if not hasattr(node, "extent"):
                    raise TaskArithError(f"{self.config_name}: line {mark.line + 1}: the alias refers to a "
                                         f"collection that contains it (an endless value); {_FIX}")
                size, height = node.extent
                self.aliases = True
                self._grow(size, level + height - 1, mark)
                return node
            self._grow(1, level, mark)
            start, deepest = self.nodes, self.deepest
            self.level, self.deepest = level, level
            node = super().compose_node(parent, index)
            self.level = level - 1
            node.extent = (self.nodes - start + 1, self.deepest - level + 1)
            self.deepest = max(deepest, self.deepest)
            return node

        def _grow(self, nodes: int, level: int, mark) -> None:
            self.nodes += nodes
            self.deepest = max(self.deepest, level)
            if level > MAX_DEPTH:
                raise TaskArithError(_too_deep(self.config_name, mark.line + 1))
            if self.nodes > MAX_NODES:
                raise TaskArithError(_too_many(self.config_name, mark.line + 1, self.aliases))

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep)
            except (ValueError, TypeError, OverflowError) as err:  # e.g. the date 2024-13-01
                raise yaml.constructor.ConstructorError(None, None, str(err), node.start_mark) from None

        def construct_yaml_int(self, node):
            text = self.construct_scalar(node)
            if len(text) > _MAX_INT_CHARS:
                return OutOfRange(text)
            value = super().construct_yaml_int(node)
            return value if -_MAX_INT < value < _MAX_INT else OutOfRange(text)

    _Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
