"""mergekit's tokenizer settings in taskarith (``tokenizer_source``, ``tokenizer:``, ``chat_template``): the
rows each input gets for the output vocabulary, and the configs refused, each in one line.

Equality with mergekit itself (tensors, tokenizer files) is checked by ``test_mergekit_parity.py``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from mergekit_models import build_family, load_tensors

from taskarith.cli import _config
from taskarith.cli._mergekit_templates import NAMED
from taskarith.errors import TaskArithError

transformers = pytest.importorskip("transformers")

EMBED = "model.embed_tokens.weight"
MERGEKIT = Path(__file__).resolve().parents[1] / ".venv-mergekit" / "lib"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama family whose ft0 and ft1 have vocabularies of their own (``mergekit_models``), and copies
    without tokenizer files: of ft1 (66 rows, the base's 64) and of the base."""
    root = tmp_path_factory.mktemp("vocab")
    family = build_family(root / "llama", "llama", n_finetuned=2, num_layers=1, hidden=16, seed=3, vocabularies=True)
    found = {"base": family.base, "ft0": family.finetuned[0], "ft1": family.finetuned[1]}
    for name in ("base", "ft1"):
        bare = root / f"{name}_bare"
        shutil.copytree(found[name], bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
        found[f"{name}_bare"] = bare
    return found


def _plan(models: dict, text: str):
    for name, path in models.items():
        text = text.replace("{" + name + "}", str(path))
    return _config.parse(textwrap.dedent(text), name="c.yml")


def _vocab(folder: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


TASK_ARITHMETIC = textwrap.dedent("""
    merge_method: task_arithmetic
    base_model: {base}
    models:
      - model: {ft0}
        parameters: {weight: 1.0}
      - model: {ft1}
        parameters: {weight: 1.0}
    dtype: float32
""")


def test_union_rows_come_from_the_model_the_base_or_the_mean(models):
    plan = _plan(models, TASK_ARITHMETIC + "tokenizer_source: union\n")
    written = json.loads(plan.files["tokenizer.json"])
    out = {**written["model"]["vocab"], **{t["content"]: t["id"] for t in written["added_tokens"]}}
    assert len(out) == 68 and plan.config["vocab_size"] == 68
    raw = {name: load_tensors(models[name])[EMBED] for name in ("base", "ft0", "ft1")}
    own = {name: _vocab(models[name]) for name in ("base", "ft0", "ft1")}
    aligned = {"ft0": plan.sources[0].tensor(EMBED), "ft1": plan.sources[1].tensor(EMBED),
               "base": plan.base.tensor(EMBED)}
    for name, tensor in aligned.items():
        assert tensor.shape == (68, 16) and plan.base.shape(EMBED) == (68, 16)
        for token, i in out.items():
            if token in own[name]:  # a model's own row, whatever its id there
                assert torch.equal(tensor[i], raw[name][own[name][token]]), (name, token)
    ft1 = aligned["ft1"]
    assert torch.equal(ft1[out["w63"]], raw["base"][own["base"]["w63"]])  # ft1 lacks it: the base's row
    assert torch.equal(ft1[out["<|im_start|>"]], raw["ft0"][own["ft0"]["<|im_start|>"]])  # only ft0 has it
    mean = (torch.zeros(16) + raw["ft0"][own["ft0"]["common"]] + raw["ft1"][own["ft1"]["common"]]) / 2
    assert torch.equal(aligned["base"][out["common"]], mean)  # not the base's: the mean of those with it


def test_padding_rows_are_the_mean_of_the_vocabulary(models):
    plan = _plan(models, TASK_ARITHMETIC + "tokenizer: {source: base, pad_to_multiple_of: 48}\n")
    tensor = plan.sources[1].tensor(EMBED)
    assert tensor.shape[0] == 96 and plan.config["vocab_size"] == 96
    assert torch.equal(tensor[64], torch.mean(tensor[:64], dim=0)) and torch.equal(tensor[64], tensor[95])
    assert "lm_head.weight" in {n for n in plan.base.names() if plan.base.shape(n)[0] == 96}


def test_a_model_path_may_carry_the_prefix_of_early_mergekit_versions(models):
    plain = _plan(models, TASK_ARITHMETIC + "tokenizer_source: {ft1}\n")
    prefixed = _plan(models, TASK_ARITHMETIC + "tokenizer_source: model:{ft1}\n")
    assert plain.files["tokenizer.json"] == prefixed.files["tokenizer.json"]
    assert plain.config["vocab_size"] == 65


def test_a_model_without_a_tokenizer_and_the_base_vocabulary_size_takes_the_base_tokens(models):
    plan = _plan(models, TASK_ARITHMETIC.replace("{ft1}", "{base_bare}") + "tokenizer_source: union\n")
    base = load_tensors(models["base_bare"])[EMBED]
    assert torch.equal(plan.sources[1].tensor(EMBED)[:64], base)


def test_a_chat_template_alone_saves_the_base_tokenizer_with_it(models):
    plan = _plan(models, """
        merge_method: linear
        models:
          - model: {base}
            parameters: {weight: 1.0}
        chat_template: llama3
    """)
    assert plan.files["chat_template.jinja"].decode() == NAMED["llama3"]
    assert "tokenizer.json" in plan.files and "vocab_size" not in (plan.config or {})


ONE_MODEL = TASK_ARITHMETIC.replace("  - model: {ft1}\n    parameters: {weight: 1.0}\n", "")
REFUSED = {  # case: (config, text added to it, phrase of the one problem; None: no problem)
    "both": (TASK_ARITHMETIC, "tokenizer_source: union\ntokenizer: {source: base}", "not both"),
    "unknown template": (TASK_ARITHMETIC, "chat_template: zephyr", "unknown chat template 'zephyr'"),
    "template not text": (TASK_ARITHMETIC, "chat_template: 5", "expected a template name or Jinja text"),
    "unknown kind": (TASK_ARITHMETIC, "tokenizer: {tokens: {x: {source: {kind: random}}}}", "unknown kind 'random'"),
    "token and id": (TASK_ARITHMETIC,
                     "tokenizer: {tokens: {x: {source: {kind: model_token, model: {base}, token: w5, token_id: 5}}}}",
                     "give one of 'token'"),
    "force alone": (TASK_ARITHMETIC, "tokenizer: {tokens: {x: {force: true}}}", "'force: true' needs a 'source'"),
    "pad": (TASK_ARITHMETIC, "tokenizer: {pad_to_multiple_of: -8}", "expected a positive whole number"),
    "source not merged": (ONE_MODEL, "tokenizer: {tokens: {'<|im_end|>': {source: {ft1}}}}",
                          "is not among the models merged"),
    "source has token": (ONE_MODEL, "tokenizer: {tokens: {'<|im_end|>': {source: {ft0}}}}", None),
    "no such token": (TASK_ARITHMETIC,
                      "tokenizer: {tokens: {x: {source: {kind: model_token, model: {base}, token: nope}}}}",
                      "has no token 'nope'"),
    "row past the end": (TASK_ARITHMETIC,
                         "tokenizer: {tokens: {x: {source: {kind: model_token, model: {ft0}, token_id: 67}}}}",
                         "has 67 rows, no row 67"),
    "model lacks it": (TASK_ARITHMETIC, "tokenizer: {tokens: {zeta: {source: {ft0}}}}", "has no token 'zeta'"),
    "rows without tokenizer": (TASK_ARITHMETIC.replace("{ft1}", "{ft1_bare}"), "tokenizer_source: union",
                               "has no tokenizer and a vocabulary of 65 rows"),
    "base without tokenizer": (TASK_ARITHMETIC.replace("{base}", "{base_bare}"), "tokenizer_source: base",
                               "has no tokenizer to build"),
    "template without tokenizer": (TASK_ARITHMETIC.replace("{base}", "{base_bare}"), "chat_template: chatml",
                                   "has no tokenizer to give the chat template"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_are_one_line(models, case):
    text, extra, phrase = REFUSED[case]
    if phrase is None:
        _plan(models, text + extra + "\n")
        return
    with pytest.raises(TaskArithError) as err:
        _plan(models, text + extra + "\n")
    message = str(err.value)
    assert "1 problem" in message and phrase in message and "\n" not in message, message


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_templates_render_as_mergekits(name):
    """taskarith's text of each template mergekit ships renders every conversation alike (errors too)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    folders = list(MERGEKIT.glob("python3*/site-packages/mergekit/_data/chat_templates"))
    if not folders:
        pytest.skip("mergekit is not installed in .venv-mergekit")
    theirs = (folders[0] / f"{name}.jinja").read_text()
    roles, contents = ["system", "user", "assistant", "user_context"], ["hi", " pad ", "a\nb "]
    for n in range(1, 4):
        for chosen in itertools.product(roles, repeat=n):
            conversation = [{"role": r, "content": contents[i % 3]} for i, r in enumerate(chosen)]
            for prompt in (False, True):
                outs = []
                for template in (theirs, NAMED[name]):
                    try:
                        outs.append(render_jinja_template([conversation], chat_template=template,
                                                          add_generation_prompt=prompt, bos_token="<s>",
                                                          eos_token="</s>")[0])
                    except Exception as error:  # noqa: BLE001 (both must refuse alike)
                        outs.append(type(error).__name__)
                assert outs[0] == outs[1], (conversation, prompt)


def test_a_tokenizer_from_an_earlier_merge_of_the_same_file(models, tmp_path):
    """mergekit-multi: the final merge takes the tokenizer of a merge written just before it."""
    from taskarith.cli import main

    config = tmp_path / "multi.yml"
    first = TASK_ARITHMETIC + "name: soup\ntokenizer_source: union\n"
    final = ("merge_method: linear\nbase_model: soup\nmodels:\n  - model: soup\n    parameters: {weight: 0.5}\n"
             "  - model: {ft0}\n    parameters: {weight: 0.5}\ndtype: float32\ntokenizer_source: model:soup\n")
    text = first + "---\n" + final
    for name, path in models.items():
        text = text.replace("{" + name + "}", str(path))
    config.write_text(text)
    assert main(["merge", str(config), "-o", str(tmp_path / "out"), "--intermediate-dir", str(tmp_path / "mid")]) == 0
    assert _vocab(tmp_path / "out") == _vocab(tmp_path / "mid" / "soup") and len(_vocab(tmp_path / "out")) == 68
    assert load_tensors(tmp_path / "out")[EMBED].shape == (68, 16)
