"""Turning a context and a question into model input ids."""

from __future__ import annotations

import torch


def build_prompt_ids(tokenizer, context: str, question: str) -> torch.Tensor:
    user = f"{context.strip()}\n\n{question.strip()}"
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    return tokenizer(f"{user}\nAnswer:", return_tensors="pt")["input_ids"]


def eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids
