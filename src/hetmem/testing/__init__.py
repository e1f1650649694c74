"""Tiny random-weight models and a character tokenizer, built offline from configs (for tests)."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def tiny_config(arch: str = "llama", max_position_embeddings: int = 512, vocab_size: int = 128, layers: int = 2):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(head_dim=16, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Larger-than-init weights make attention peaky, so sparse selection actually matters in tests.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.eval()


def char_tokenizer(vocab_size: int = 128):
    """A character-level fast tokenizer over printable ASCII (ids 3..), with <pad>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers import decoders

    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_model_dir(path: Path, arch: str = "llama", **kw) -> Path:
    """A local HF model directory (config, safetensors, tokenizer) usable as ``--model PATH``."""
    path = Path(path)
    tiny_model(arch, **kw).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def family_model(family, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random-weight model of one row of ``hetmem.llm.families.SUPPORTED_FAMILIES``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family.model_type, **{**family.config, **overrides})
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def save_family_dir(path: Path, family, seed: int = 0) -> Path:
    """A local HF model directory (config, safetensors, char tokenizer) of one family row."""
    path = Path(path)
    family_model(family, seed).save_pretrained(path)
    char_tokenizer(family.config.get("vocab_size", 128)).save_pretrained(path)
    return path
