"""Merge configs from hostile or careless hands: every one fails fast with a TaskArithError naming the file,
the line and the key, never a raw Python exception, an explosion of memory or a recursion error."""

from __future__ import annotations

import codecs
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from taskarith import cli
from taskarith.cli import _config, _yaml
from taskarith.errors import TaskArithError

MAX_DEPTH, MAX_NODES, MAX_BYTES = _yaml.MAX_DEPTH, _yaml.MAX_NODES, _yaml.MAX_BYTES


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Run in a folder holding the checkpoints configs name (the config reader only checks that they exist)."""
    monkeypatch.chdir(tmp_path)
    for name in ("base.safetensors", "ft0.safetensors", "ft1.safetensors", "tv.safetensors"):
        save_file({"model.layers.0.w": torch.zeros(2)}, tmp_path / name)
    return tmp_path


def error(text: str, name: str = "c.yaml", **kwargs) -> str:
    with pytest.raises(TaskArithError) as info:
        _config.parse(text, name=name, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{name}: ") or "PyYAML" in message, message
    return message


def file_error(path) -> str:
    with pytest.raises(TaskArithError) as info:
        _config.load(path)
    return str(info.value)


# ------------------------------------------------------------ alias bombs


def lol_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def mapping_bomb() -> str:
    lines = ["method: ties", "vectors: [tv.safetensors]", "x0: &x0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    for i in range(1, 12):
        lines.append(f"x{i}: &x{i} {{{', '.join(f'k{j}: *x{i - 1}' for j in range(8))}}}")
    return "\n".join(lines) + "\n"


def mergekit_bomb() -> str:  # five levels stay under the limit; the weights that use them do not
    levels = "".join(f"  {line}\n" for line in lol_bomb(5).splitlines())
    models = "".join(f"  - model: ft{i}.safetensors\n    parameters: {{weight: *e}}\n" for i in range(2))
    return f"merge_method: ties\nbase_model: base.safetensors\nx:\n{levels}models:\n{models}"


BOMBS = {  # text, the line of the first alias that takes the expansion past MAX_NODES
    "billion laughs": (lol_bomb(), 6),
    "mapping bomb": (mapping_bomb(), 8),
    "inside mergekit weights": (mergekit_bomb(), 11),
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_alias_bombs_fail_fast(here, case):
    text, line = BOMBS[case]
    start = time.perf_counter()
    message = error(text)
    assert time.perf_counter() - start < 2.0
    assert message.startswith(f"c.yaml: line {line}: the config holds more than {MAX_NODES:,} values (each YAML "
                              "alias '*name' repeats all it refers to)"), message


def test_alias_bomb_on_the_command_line_is_one_line_and_fast(here, capsys):
    (here / "bomb.yaml").write_text(BOMBS["billion laughs"][0])
    start = time.perf_counter()
    assert cli.main(["merge", "bomb.yaml", "-o", "out.safetensors", "--dry-run"]) == 1
    assert time.perf_counter() - start < 2.0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("taskarith: error: bomb.yaml: line ") and captured.err.count("\n") == 1


def test_recursive_alias_is_refused(here):
    message = error("method: ties\nvectors: &v [tv.safetensors, *v]\n")
    assert "line 2" in message and "contains it" in message


def test_aliases_within_limits_still_work(here):
    plan = _config.parse("""
merge_method: ties
base_model: base.safetensors
parameters: {normalize: true}
models:
  - model: ft0.safetensors
    parameters: &same {weight: 0.7, density: 0.4}
  - model: ft1.safetensors
    parameters: *same
""", name="mk.yaml")
    assert [str(s) for s in plan.sources] == ["ft0.safetensors", "ft1.safetensors"]
    assert plan.options["density"] == pytest.approx((0.4, 0.4)) and plan.weights == pytest.approx([0.7, 0.7])
    merged = _config.parse("method: ties\nvectors:\n  - &v {vector: tv.safetensors, weight: 0.5}\n"
                           "  - {<<: *v, weight: 2.0}\n", name="m.yaml")  # a YAML merge key
    assert merged.weights == [0.5, 2.0] and len(merged.sources) == 2


def test_alias_expansion_counts_towards_depth(here):
    inner = "[" * 40 + "]" * 40
    message = error(f"a: &a {inner}\nb: {'[' * 30}*a{']' * 30}\n")
    assert f"line 2: nested more than {MAX_DEPTH} levels deep" in message


# ------------------------------------------------------------- nesting and size


DEEP = {
    "json lists": "[" * 100_000 + "]" * 100_000,
    "json objects": '{"a": ' * 30_000 + "1" + "}" * 30_000,
    "json inside a config": '{"method": "ties", "options": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "yaml flow": "method: ties\noptions: " + "[" * 100_000,
    "yaml block": "".join(" " * i + f"k{i}:\n" for i in range(500)),
}


@pytest.mark.parametrize("case", list(DEEP))
def test_deep_nesting_is_refused_without_recursion_error(case):
    start = time.perf_counter()
    message = error(DEEP[case])
    assert f"nested more than {MAX_DEPTH} levels deep" in message
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("form", ["json", "yaml"])
def test_depth_limit_is_exact(form):
    def text(depth):  # nested to exactly ``depth`` levels (the top level is 1)
        if form == "json":
            return "[" * depth + "]" * depth
        return "".join(" " * i + f"k{i}:\n" for i in range(depth - 1))
    data, _, _ = _yaml.load(text(MAX_DEPTH), "ok")
    assert data is not None
    with pytest.raises(TaskArithError, match=f"nested more than {MAX_DEPTH} levels"):
        _yaml.load(text(MAX_DEPTH + 1), "deep")


@pytest.mark.parametrize("form", ["json", "yaml"])
def test_too_many_values_without_aliases(form):
    items = ",".join(["1"] * (MAX_NODES + 1))
    text = f'{{"v": [{items}]}}' if form == "json" else f"v: [{items}]"
    message = error(text)
    assert f"holds more than {MAX_NODES:,} values" in message and "alias" not in message


def test_oversized_config_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"# padding\n" * (MAX_BYTES // 10 + 1))
    message = file_error(path)
    assert message.startswith(f"{path}: the config is {path.stat().st_size:,} bytes")
    assert f"{MAX_BYTES:,}-byte limit" in message
    exact = tmp_path / "exact.yaml"
    exact.write_bytes(b"#" * (MAX_BYTES - 1) + b"\n")  # at the limit: read, then refused as empty
    assert "got nothing" in file_error(exact)
    assert "over the" in error("#" * (MAX_BYTES + 1))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_endless_file_is_read_only_up_to_the_limit():
    assert file_error("/dev/zero").startswith("/dev/zero: the config is endless (a device or a pipe), over the")


# ------------------------------------------------------------- huge numbers


HUGE = {  # YAML text -> what the message shows
    ".inf": "got inf", "-.inf": "got -inf", ".nan": "got nan", ".NaN": "got nan",
    "1.0e+400": "got inf", "-1.0e+400": "got -inf", "1.0e400": "got '1.0e400' (YAML 1.1 reads an exponent",
    "1" + "0" * 5000: "an integer of 5001 digits", "-" + "9" * 5000: "an integer of 5000 digits",
    "0x" + "f" * 40: "out of range", str(2**64): "an integer of 20 digits", "1e400": "got '1e400'",
}
MERGEKIT = """merge_method: ties
base_model: base.safetensors
parameters:
  lambda: {lam}
models:
  - model: ft0.safetensors
    parameters:
      weight: {weight}
      density: {density}
"""
MERGEKIT_KEYS = {"lambda": (4, "parameters.lambda"), "weight": (8, "models[0].parameters.weight"),
                 "density": (9, "models[0].parameters.density")}


@pytest.mark.parametrize("value", list(HUGE))
def test_huge_native_weight_names_line_and_key(here, value):
    message = error(f"method: ties\nvectors:\n  - vector: tv.safetensors\n    weight: {value}\n")
    assert "line 4, vectors[0].weight: expected a finite number, got " in message and HUGE[value] in message


@pytest.mark.parametrize("key", list(MERGEKIT_KEYS))
@pytest.mark.parametrize("value", list(HUGE))
def test_huge_mergekit_numbers_name_line_and_key(here, key, value):
    numbers = {"lam": 1.0, "weight": 1.0, "density": 0.5, {"lambda": "lam"}.get(key, key): value}
    message = error(MERGEKIT.format(**numbers))
    line, dotted = MERGEKIT_KEYS[key]
    assert f"line {line}, {dotted}: expected a finite number, got " in message and HUGE[value] in message
    assert message.count("expected a finite number") == 1, message


JSON_HUGE = {"1e400": "got inf", "-1e400": "got -inf", "Infinity": "got inf", "NaN": "got nan",
             "1" + "0" * 5000: "an integer of 5001 digits"}


@pytest.mark.parametrize("value", list(JSON_HUGE))
def test_huge_json_numbers_name_line_and_key(here, value):
    text = ('{\n  "method": "ties",\n  "vectors": [\n    {"vector": "tv.safetensors",\n'
            f'     "weight": {value}}}\n  ]\n}}')
    message = error(text, name="c.json")
    assert "line 5, vectors[0].weight: expected a finite number, got " in message and JSON_HUGE[value] in message


@pytest.mark.parametrize("value,shown", [(".nan", "density=nan"), (".inf", "density=inf"),
                                         ("1" + "0" * 5000, "density=an integer of 5001 digits (100000…000)")])
def test_non_finite_native_options_are_named(here, value, shown):
    message = error(f"method: ties\nvectors: [tv.safetensors]\noptions:\n  density: {value}\n  scale: -.inf\n")
    assert "line 3, options: bad options for merge method 'ties' (2)" in message
    assert f"{shown} is invalid" in message and "scale=-inf is invalid: expected a finite number" in message


@pytest.mark.parametrize("seed,shown", [("1" + "0" * 30, "an integer of 31 digits"), ("2.5", "the number 2.5"),
                                        (".inf", "the number inf"), ("'7'", "text '7'"), ("true", "a boolean True")])
def test_mergekit_seed_must_be_an_integer(here, seed, shown):
    text = ("merge_method: dare_ties\nbase_model: base.safetensors\nmodels:\n  - model: ft0.safetensors\n"
            f"    parameters: {{weight: 1.0, density: 0.5}}\nseed: {seed}\n")
    assert f"c.yaml: 1 problem: line 6, seed: expected an integer seed, got {shown}" in error(text)
    assert _config.parse(text.replace(f"seed: {seed}", "seed: 3"), name="ok.yaml").options["seed"] == 3


def test_numbers_within_range_are_accepted(here):
    plan = _config.parse(f"method: task_arithmetic\nvectors:\n  - {{vector: tv.safetensors, weight: 0x10}}\n"
                         f"  - {{vector: tv.safetensors, weight: {2**64 - 1}}}\n", name="ok.yaml")
    assert plan.weights == [16.0, float(2**64 - 1)]


def test_mergekit_weights_that_overflow_their_sum(here):
    text = ("merge_method: task_arithmetic\nbase_model: base.safetensors\nparameters: {normalize: true}\nmodels:\n"
            "  - model: ft0.safetensors\n    parameters: {weight: 1.0e+308}\n"
            "  - model: ft1.safetensors\n    parameters: {weight: 1.0e+308}\n")
    assert "line 4, models: the weights [1e+308, 1e+308] sum to inf" in error(text)


# ------------------------------------------------------- mergekit: no model left


NO_MODEL = {
    "every model is the base": ("models:\n  - model: base.safetensors\n  - model: ./base.safetensors\n",
                                "line 3, models: no model to merge besides the base model"),
    "empty list": ("models: []\n", "line 3, models: expected a non-empty list"),
    "no models key": ("", "models: expected a non-empty list"),
}


@pytest.mark.parametrize("case", list(NO_MODEL))
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_mergekit_config_without_models_is_an_error(here, case, method):
    text, expected = NO_MODEL[case]
    message = error(f"merge_method: {method}\nbase_model: base.safetensors\n{text}seed: 1\n")
    assert expected in message, message


# -------------------------------------------------------------- careless configs


CARELESS = {  # text -> fragments of the message (file name, line, key and fix)
    "top-level list": ("- method: ties\n- vectors: []\n", ["a merge config is a mapping of keys", "got a list"]),
    "top-level text": ("ties\n", ["got text 'ties'"]),
    "top-level number": ("5\n", ["got the number 5"]),
    "empty": ("", ["got nothing (the file is empty or only comments)"]),
    "comments only": ("# method: ties\n", ["got nothing"]),
    "models as a mapping": ("method: ties\nbase: base.safetensors\nmodels: {ft0.safetensors: 1}\n",
                            ["line 3, models: expected a non-empty list"]),
    "models as text": ("method: ties\nbase: base.safetensors\nmodels: ft0.safetensors\n",
                       ["line 3, models: expected a non-empty list"]),
    "mergekit models as a mapping": ("merge_method: ties\nbase_model: base.safetensors\nmodels: {a: 1}\n",
                                     ["line 3, models: expected a non-empty list of '- model: PATH' entries"]),
    "model entry a number": ("method: ties\nbase: base.safetensors\nmodels:\n  - 5\n  - 6.5\n",
                             ["line 4, models[0]: expected a path (text), got the number 5",
                              "line 5, models[1]: expected a path (text), got the number 6.5"]),
    "mergekit model entry a number": ("merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - 5\n",
                                      ["line 4, models[0].model: expected a path (text), got the number 5"]),
    "parameters a list": (("merge_method: ties\nbase_model: base.safetensors\nparameters: [1]\nmodels:\n"
                           "  - model: ft0.safetensors\n    parameters: [1, 2]\n"),
                          ["line 3, parameters: expected a mapping of parameter: value", "got a list [1]",
                           "line 6, models[0].parameters: expected a mapping of parameter: value, got a list"]),
    "non-string paths": ("method: ties\nbase: 5\nmodels:\n  - model: [a, b]\n  - model: {x: 1}\n  - true\n",
                         ["line 2, base: expected a path (text), got the number 5",
                          "line 4, models[0].model: expected a path (text), got a list ['a', 'b']",
                          "line 5, models[1].model: expected a path (text), got a mapping {'x': 1}",
                          "line 6, models[2]: expected a path (text), got a boolean True"]),
    "mergekit non-string base": ("merge_method: ties\nbase_model: [base.safetensors]\nmodels: [ft0.safetensors]\n",
                                 ["line 2, base_model: expected a path (text), got a list"]),
    "method and dtype lists": ("method: [ties]\nvectors: [tv.safetensors]\ndtype: [fp16]\n",
                               ["line 1, method: unknown merge method ['ties']",
                                "line 3, dtype: unknown dtype ['fp16']"]),
    "mergekit method a list": ("merge_method: [ties]\nbase_model: base.safetensors\nmodels: [ft0.safetensors]\n",
                               ["line 1, merge_method: unknown mergekit method ['ties']"]),
    "flag not a boolean": (("merge_method: ties\nbase_model: base.safetensors\nparameters: {normalize: 1}\n"
                            "models: [ft0.safetensors]\n"),
                           ["line 3, parameters.normalize: expected true or false, got the number 1"]),
    "duplicate keys": ("method: ties\nvectors: [tv.safetensors]\nmethod: dare_ties\n",
                       ["line 3, method: duplicate key (the later value would silently win)"]),
    "tab-indented yaml": ("method: ties\nvectors:\n\t- tv.safetensors\n", ["line 3: not valid YAML", "not tabs"]),
    "invalid date": ("method: ties\nvectors: [tv.safetensors]\noptions: {density: 2024-13-01}\n",
                     ["line 3: not valid YAML: month must be in 1..12"]),
    "python tag": ("method: !!python/object/apply:os.system [ls]\n", ["line 1: not valid YAML", "constructor"]),
    "unhashable key": ("? [a, b]\n: 1\n", ["line 1: not valid YAML", "unhashable key"]),
    "two documents": ("method: ties\n---\nmethod: dare\n", ["line 2: not valid YAML", "another document"]),
    "control character": ("method: ties\x07\n", ["line 1: the control character U+0007 is not allowed"]),
    "NUL in the text": ("method: ties\nvectors: [a\0b]\n", ["line 2: a NUL character: this is a binary file"]),
    "NUL in a path": ('method: ties\nvectors: ["tv\\0.safetensors"]\n',
                      ["line 2, vectors[0]: ", "'tv\\x00.safetensors'"]),
    "unknown home folder": ("method: ties\nvectors: [~no-such-user-xyz/tv.safetensors]\n",
                            ["line 2, vectors[0]: cannot use the path '~no-such-user-xyz/tv.safetensors'"]),
    "path too long": ("method: ties\nvectors: [" + "a" * 5000 + ".safetensors]\n",
                      ["line 2, vectors[0]: cannot use the path 'aaaa", "…"]),
    "mergekit lora with NUL": ('merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - model: "a+b\\0"\n',
                               ["line 4, models[0].model: no such file 'a'",
                                "line 4, models[0].model: no such adapter folder: 'b\\x00'"]),
}


@pytest.mark.parametrize("case", list(CARELESS))
def test_careless_configs_are_task_arith_errors(here, case):
    text, fragments = CARELESS[case]
    message = error(text, name="careless.yaml")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_every_problem_is_reported_at_once(here):
    message = error("method: ties\nvectors:\n  - {vector: tv.safetensors, weight: .nan}\n  - {vector: 5}\n"
                    "dtype: [x]\ncolour: 1.0e400\n")
    assert message.startswith("c.yaml: 4 problems: ")
    for fragment in ("line 3, vectors[0].weight: expected a finite number, got nan",
                     "line 4, vectors[1].vector: expected a path", "line 5, dtype: unknown dtype ['x']",
                     "line 6, colour: unknown key 'colour'"):
        assert fragment in message


def test_messages_stay_short_for_hostile_configs(here):
    long_key = "k" * 100_000
    text = f"method: ties\nvectors: [tv.safetensors]\n? {long_key}\n: 1\n" + "".join(f"x{i}: 1\n" for i in range(500))
    message = error(text)
    assert message.startswith("c.yaml: 501 problems: ") and "; ... (481 more)." in message
    assert len(message) < 4000 and "kkkk…kkkk" in message
    value = error(f"method: ties\nvectors:\n  - {{vector: tv.safetensors, weight: {'w' * 100_000}}}\n")
    assert len(value) < 400


# ------------------------------------------------------------------ encodings


@pytest.mark.parametrize("encoding,bom", [("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE),
                                          ("utf-16-be", codecs.BOM_UTF16_BE), ("utf-32-le", codecs.BOM_UTF32_LE)])
@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_byte_order_marks_are_read(here, encoding, bom, suffix):
    text = "method: ties\nvectors: [tv.safetensors]\n" if suffix == "yaml" else \
        '{"method": "ties", "vectors": ["tv.safetensors"]}'
    path = here / f"bom.{suffix}"
    path.write_bytes(bom + text.encode(encoding))
    assert _config.load(path).method == "ties"
    assert _config.parse("\ufeff" + text, name=f"p.{suffix}").method == "ties"


@pytest.mark.parametrize("content,fragments", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["line 1: byte 0x89 is not UTF-8 text", "save it as UTF-8"]),
    (b"method: ties\n" + b"\x08\x00\x00\x00\x00\x00\x00\x00{}", ["line 2: a NUL character", "binary file"]),
    (b"method: ties\nbase: caf\xe9\n", ["line 2: byte 0xe9 is not UTF-8 text"]),
])
def test_binary_files_are_refused(here, content, fragments):
    path = here / "model.safetensors"
    path.write_bytes(content)
    message = file_error(path)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_unreadable_config_is_a_task_arith_error(here):
    assert "cannot read the config" in file_error(here / "missing.yaml")
    assert "cannot read the config" in file_error(here)  # a folder


# ------------------------------------------------------------------------- JSON


def test_json_with_tabs_and_exponents_is_read_as_json(here):
    text = '{\n\t"method": "ties",\n\t"vectors": [{"vector": "tv.safetensors", "weight": 1e-3}],\n\t"dtype": 7\n}'
    message = error(text, name="t.json")  # the only problem is the dtype, on its line
    assert message.startswith("t.json: 1 problem: line 4, dtype: unknown dtype 7")
    plan = _config.parse(text.replace('"dtype": 7', '"dtype": "bf16"'), name="t.json")
    assert plan.weights == [0.001]


def test_json_duplicate_keys_are_reported(here):
    message = error('{"method": "ties",\n "vectors": ["tv.safetensors"],\n "method": "dare"}', name="d.json")
    assert "line 3, method: duplicate key" in message


def test_without_pyyaml_json_is_still_bounded(here, monkeypatch):
    monkeypatch.setattr(_yaml, "yaml", None)
    assert _config.parse('{"method": "ties", "vectors": ["tv.safetensors"]}', name="c.json").method == "ties"
    assert "nested more than" in error("[" * 100_000 + "]" * 100_000, name="c.json")
    assert "vectors[0].weight: expected a finite number, got inf" in error(
        '{"method": "ties", "vectors": [{"vector": "tv.safetensors", "weight": 1e400}]}', name="c.json")
    assert "an integer of 5001 digits" in error(
        '{"method": "ties", "vectors": [{"vector": "tv.safetensors", "weight": 1' + "0" * 5000 + "}]}", name="c.json")
    assert "line 2: not valid JSON" in error('{"method": "ties",\n oops}', name="c.json")
    assert "needs PyYAML" in error("method: ties\n", name="c.yaml")


# ------------------------------------------------------------------------ paths


def test_relative_paths_are_relative_to_the_current_directory(here):
    (here / "configs").mkdir()
    (here / "configs" / "only-next-to-config.safetensors").touch()
    config = here / "configs" / "c.yaml"
    config.write_text("method: ties\nvectors: [tv.safetensors]\n")
    plan = _config.load(config)
    assert [str(s) for s in plan.sources] == ["tv.safetensors"]
    config.write_text("method: ties\nvectors: [only-next-to-config.safetensors]\n")
    assert "line 2, vectors[0]: no such file 'only-next-to-config.safetensors'" in file_error(config)
