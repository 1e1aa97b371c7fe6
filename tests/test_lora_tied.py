"""LoRA adapters whose modules_to_save hits a tied weight, against PEFT's own merge on a tiny Qwen2.

Qwen2 with ``tie_word_embeddings=True`` shares one tensor between ``lm_head`` and
``model.embed_tokens``. PEFT trains a ``modules_to_save`` module as a deep copy, so
``merge_and_unload()`` unties the pair: the saved module's weight under its own
name, the base weight under the other (and the merged config says
``tie_word_embeddings=False``). With ``ensure_weight_tying=True`` PEFT ties the
copies instead. Everything is built locally from a random initialisation.
"""

from __future__ import annotations

import pytest
import torch

import taskarith as ta
from taskarith.lora import from_lora

transformers = pytest.importorskip("transformers", reason="the PEFT comparison needs transformers")
peft = pytest.importorskip("peft", reason="the PEFT comparison needs peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),  # PEFT's notes on tied and saved embeddings
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]

TOL = {"rtol": 1e-5, "atol": 1e-6}  # PEFT's matmul may sum in another order: a few float32 ulps
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _config(tie: bool = True):
    return transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)


@pytest.fixture
def base_folder(tmp_path):
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(_config()).eval().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _load(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def _adapter(base_folder, tmp_path, **lora):
    """(adapter folder, PEFT's merged model) for random non-zero factors and saved modules."""
    wrapped = peft.get_peft_model(_load(base_folder), peft.LoraConfig(r=4, lora_alpha=8, **lora))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:  # lora_B (and embedding A) start at zero
                p.copy_(torch.randn(p.shape, generator=gen))
    wrapped.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", wrapped.merge_and_unload().eval()


def _assert_same_state(ours: dict, expected: dict):
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, **TOL, msg=name)


def _logits(model):
    ids = torch.arange(12).reshape(2, 6) * 5 % 64
    with torch.no_grad():
        return model(ids).logits


def _untied_logits(state: dict):
    """Logits of ``state`` in a fresh untied Qwen2 (PEFT's merge unties the embeddings)."""
    model = transformers.Qwen2ForCausalLM(_config(tie=False)).eval()
    model.load_state_dict(state)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    return _logits(model)


def test_modules_to_save_lm_head_on_tied_qwen2_matches_peft(base_folder, tmp_path):
    adapter, merged = _adapter(base_folder, tmp_path, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight  # what PEFT does: untie
    model = _load(base_folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base_embed = model.model.embed_tokens.weight.detach().clone()
    for full in (False, True):
        tv = from_lora(adapter, base=model, full=full)
        assert tv.aliases == {} and not tv[EMBED].any()
        ours = tv.apply_to(model, strict=full)
        _assert_same_state(ours, merged.state_dict())
        assert torch.equal(ours[EMBED], base_embed) and not torch.equal(ours[HEAD], base_embed)
        expected = _logits(merged)
        torch.testing.assert_close(_untied_logits(ours), expected, **TOL)
        assert (expected - _logits(model)).abs().max() > 0.1  # the adapter changes the outputs
    assert torch.equal(model.model.embed_tokens.weight, base_embed)  # the base module is left as it was


def test_a_tied_folder_base_is_refused_rather_than_re_tied(base_folder, tmp_path):
    adapter, _ = _adapter(base_folder, tmp_path, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    # The folder stores model.embed_tokens.weight only, and transformers ties lm_head to it again on loading,
    # so no vector applied to it can give PEFT's untied result.
    with pytest.raises(ta.TaskArithError, match=r"own copy of 'lm_head.weight', and the base folder .*tie_word_emb"):
        from_lora(adapter, base=base_folder)
    with pytest.raises(ta.KeyMismatchError, match="lm_head.weight"):  # the untied vector does not fit it either
        from_lora(adapter, base=_load(base_folder)).apply_to(base_folder, strict=False)


# LoRA options -> whether PEFT's merged model keeps the tie
CASES = {
    "modules_to_save_embed_tokens": ({"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}, False),
    "modules_to_save_both": ({"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}, False),
    "lora_embed_tokens_copied_lm_head": ({"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
                                         False),
    "ensure_weight_tying": ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True},
                            True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_other_tied_modules_to_save_cases_match_peft(base_folder, tmp_path, case):
    options, tied = CASES[case]
    adapter, merged = _adapter(base_folder, tmp_path, **options)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    model = _load(base_folder)
    ours = from_lora(adapter, base=model).apply_to(model, strict=False)
    _assert_same_state(ours, merged.state_dict())
    assert (ours[HEAD].data_ptr() == ours[EMBED].data_ptr()) == tied
    torch.testing.assert_close(_untied_logits(ours), _logits(merged), **TOL)


def test_an_untied_base_takes_the_copy_on_lm_head_only(base_folder, tmp_path):
    adapter, merged = _adapter(base_folder, tmp_path, target_modules=["q_proj"], modules_to_save=["lm_head"])
    untied = _load(base_folder, tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    tv = from_lora(adapter, base=untied)
    assert EMBED not in tv  # nothing to untie: the embedding is simply not touched
    _assert_same_state(tv.apply_to(untied, strict=False), merged.state_dict())


def test_ensure_weight_tying_on_a_lora_embedding_is_refused(base_folder, tmp_path):
    # PEFT ties lm_head's LoRA to embed_tokens' and merge_and_unload adds the delta to the shared tensor twice,
    # which no single delta per tied weight reproduces: refused rather than approximated.
    adapter, merged = _adapter(base_folder, tmp_path, target_modules=["q_proj", "embed_tokens"],
                               ensure_weight_tying=True)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with pytest.raises(ta.TaskArithError, match="several names of one tied weight"):
        from_lora(adapter, base=_load(base_folder))

