"""Tiny random Hugging Face models for the mergekit parity suite: a base and "fine-tuned" variants.

Each family is written with ``save_pretrained`` (safetensors) into a folder: ``base/`` and ``ft0/``,
``ft1/``, ... Every variant is ``base + delta_i``, where the deltas share structure on purpose, so that
the merge methods meet the cases where they differ:

- a direction common to all deltas, entering with the sign of ``SIGNS[i]``: sign conflicts for TIES;
- entries where ``ft1``'s delta is exactly minus ``ft0``'s: signed sums that are exactly zero (the
  tie of sign election), and exact cancellations;
- entries where a delta is exactly zero (each variant its own): entries changed by one model only,
  by some, or by none (RAM's unique/overlap split; zeros inside magnitude trims).

In float32 every weight lies on a grid that makes ``ft_i - base`` exact, so both tools see the
very deltas written here (no rounding in the subtraction). bfloat16 families are the float32 ones
rounded to bfloat16. Everything is deterministic for a seed: the generators are seeded per tensor,
by name, so the values do not depend on the order the models list their parameters in.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["ARCHS", "SIGNS", "ModelFamily", "build_family", "describe", "load_tensors", "tiny_config"]

ARCHS = ("llama", "qwen2", "gpt2", "mistral")
SIGNS = (1.0, -1.0, 0.5, -0.5)  # the common direction's sign in ft0, ft1, ... (then repeats)
VOCAB = 64
DELTA_SCALE = 0.01  # fine-tuning deltas against weights of std 0.02 (and norms of 1.0)
ZERO_FRACTION = 0.2  # entries each variant leaves unchanged
OPPOSED_FRACTION = 0.05  # entries where ft1's delta is exactly -ft0's


@dataclass(frozen=True)
class ModelFamily:
    arch: str
    base: Path
    finetuned: tuple[Path, ...]
    dtype: torch.dtype
    num_layers: int
    tied: bool

    @property
    def models(self) -> tuple[Path, ...]:
        """The base, then the fine-tuned variants."""
        return (self.base, *self.finetuned)


def tiny_config(arch: str, *, num_layers: int = 2, hidden: int = 32, vocab: int = VOCAB):
    """A Transformers config of ``arch`` (one of :data:`ARCHS`) with ``num_layers`` layers of width ``hidden``."""
    import transformers

    common = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":  # Conv1D layers ((in, out) weights), learned positions, LayerNorm with bias; ties
        return transformers.GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=64,
                                       n_inner=2 * hidden, tie_word_embeddings=True, **common)
    llama_like = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": num_layers,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **common}
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **llama_like)
    if arch == "qwen2":  # q/k/v biases, tied embeddings
        return transformers.Qwen2Config(tie_word_embeddings=True, **llama_like)
    if arch == "mistral":
        return transformers.MistralConfig(tie_word_embeddings=False, sliding_window=None, **llama_like)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def _generator(seed: int, *parts: object) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _on_grid(x: torch.Tensor, step: float) -> torch.Tensor:
    return torch.round(x / step) * step


def _deltas(name: str, base: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base tensor moved onto an exact grid, and ``n`` deltas on the same grid (see the module doc)."""
    gen = _generator(seed, "delta", name)
    shape = base.shape
    shared = torch.randn(shape, generator=gen)
    opposed = torch.rand(shape, generator=gen) < OPPOSED_FRACTION
    deltas = []
    for i in range(n):
        own = torch.randn(shape, generator=gen)
        delta = DELTA_SCALE * (0.8 * SIGNS[i % len(SIGNS)] * shared + 0.6 * own)
        delta[torch.rand(shape, generator=gen) < ZERO_FRACTION] = 0.0
        if i == 1:
            delta[opposed] = -deltas[0][opposed]
        deltas.append(delta)
    # A grid of 2^(e-24) with 2^e above every |base| + |delta|: all sums and differences are exact in float32.
    bound = base.abs().max().item() + max(d.abs().max().item() for d in deltas)
    exponent = int(torch.tensor(bound).log2().floor().item()) + 1
    step = 2.0 ** (exponent - 24)
    return _on_grid(base, step), [_on_grid(d, step) for d in deltas]


def _tokenizer(folder: Path) -> None:
    """A word-level tokenizer of :data:`VOCAB` tokens (tokenizer.json and tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)


def build_family(root: Path, arch: str, *, n_finetuned: int = 3, num_layers: int = 2, hidden: int = 32,
                 seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                 vocabularies: bool = False) -> ModelFamily:
    """Write ``root/base`` and ``root/ft0`` ... ``root/ft{n-1}`` (see the module doc) and describe them.
    ``vocabularies``: ``ft0`` and ``ft1`` get vocabularies of their own (see :func:`_vary_vocabularies`)."""
    import transformers

    if n_finetuned < 1:
        raise ValueError("n_finetuned must be at least 1")
    config = tiny_config(arch, num_layers=num_layers, hidden=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = transformers.AutoModelForCausalLM.from_config(config).eval()
    variants = [copy.deepcopy(base) for _ in range(n_finetuned)]
    with torch.no_grad():
        named = dict(base.named_parameters())  # tied parameters are listed once, so ties survive
        tuned = [dict(v.named_parameters()) for v in variants]
        for name, param in named.items():
            on_grid, deltas = _deltas(name, param.detach().float(), n_finetuned, seed)
            param.copy_(on_grid)
            for params, delta in zip(tuned, deltas):
                params[name].copy_(on_grid + delta)
    root = Path(root)
    folders = []
    for label, model in [("base", base)] + [(f"ft{i}", v) for i, v in enumerate(variants)]:
        folder = root / label
        model.to(dtype).save_pretrained(folder)
        if tokenizer:
            _tokenizer(folder)
        folders.append(folder)
    if vocabularies:
        if n_finetuned < 2 or not tokenizer:
            raise ValueError("vocabularies need two fine-tuned models with tokenizers")
        _vary_vocabularies(folders, seed)
    return ModelFamily(arch, folders[0], tuple(folders[1:]), dtype, num_layers, bool(config.tie_word_embeddings))


# ft0 adds tokens to the base's vocabulary as added tokens (two special chat markers and a word); ft1's
# own vocabulary drops "w63", swaps the ids of "w10" and "w11" and ends with two new words, one of them
# ft0's added word. A merge's output vocabulary then holds tokens that some models lack, tokens shared
# by the fine-tuned models but not the base, and ids that differ between the models.
FT0_ADDED = ("<|im_start|>", "<|im_end|>", "common")
FT1_NEW = ("zeta", "common")
FT0_CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def _base_vocab() -> dict[str, int]:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    return vocab


def _fast_tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _vary_vocabularies(folders: list[Path], seed: int) -> None:
    """Give ``ft0`` and ``ft1`` the vocabularies described above: tokenizer, ``vocab_size`` and every
    vocabulary tensor (embeddings; the head where it is not tied) re-indexed to it. A token the base has
    keeps the fine-tuned row; a new token gets a fresh row (multiples of 2^-12 below 0.06 in magnitude,
    so that averages of two rows are exact)."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken

    base_vocab = _base_vocab()
    ft0 = _fast_tokenizer(base_vocab)
    ft0.add_tokens([AddedToken(t, special=True, normalized=False) for t in FT0_ADDED[:2]])
    ft0.add_tokens(list(FT0_ADDED[2:]))
    ft0.chat_template = FT0_CHAT_TEMPLATE
    words = [t for t in base_vocab if t != f"w{VOCAB - 1}"]
    words[10], words[11] = words[11], words[10]
    ft1 = _fast_tokenizer({t: i for i, t in enumerate(words + list(FT1_NEW))})
    for index, (folder, tokenizer) in enumerate([(folders[1], ft0), (folders[2], ft1)]):
        vocab = tokenizer.get_vocab()
        order = sorted(vocab, key=vocab.__getitem__)
        weights = folder / "model.safetensors"
        tensors = load_file(weights)
        for name in [n for n in tensors if n in ("model.embed_tokens.weight", "lm_head.weight")]:
            old = tensors[name]
            gen = _generator(seed, "vocabulary", index, name)
            fresh = torch.round(0.02 * torch.randn((len(order), *old.shape[1:]), generator=gen) * 4096) / 4096
            fresh = fresh.clamp(-0.06, 0.06).to(old.dtype)
            rows = [old[base_vocab[t]] if t in base_vocab else fresh[i] for i, t in enumerate(order)]
            tensors[name] = torch.stack(rows).contiguous()
        save_file(tensors, weights, metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["vocab_size"] = len(order)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / stale).unlink(missing_ok=True)
        tokenizer.save_pretrained(folder)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of a model folder, by name."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {folder}: {sorted(p.name for p in folder.iterdir())}")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key in out:
                    raise ValueError(f"{key} is stored twice in {folder}")
                out[key] = f.get_tensor(key)
    return out


def describe(family: ModelFamily) -> str:
    return json.dumps({"arch": family.arch, "dtype": str(family.dtype), "layers": family.num_layers,
                       "tied": family.tied, "models": [str(p) for p in family.models]})
