"""The model families hetmem runs exactly, as one table, and the refusal of everything else.

``SUPPORTED_FAMILIES`` is the test table: ``tests/test_model_families.py`` builds each row's tiny
random-weight config, saves it with ``save_pretrained``, loads it through ``load_model`` and checks that
hetmem's ``dense`` greedy output equals transformers' own eager attention, and that every selecting
method at a budget covering the context equals ``dense``. Adding a family is adding one row here.
``hetmem methods`` and the README's support table (``python -m hetmem.llm.families README.md``) are
generated from the same rows.

``check_supported`` runs on the model's config before any weight is loaded: a model type that is not in
the table, or a feature of a listed type that hetmem does not handle, is refused in one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hetmem.errors import HetmemError

# shared by every tiny config: 64-wide, 4 query heads over 2 KV heads of 16 dims, a 128-token char vocabulary
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, tie_word_embeddings=False, initializer_range=0.08)
WINDOW = 12  # the tiny sliding window: the test prompts are 4x longer, so the window really bites


@dataclass(frozen=True)
class Family:
    """One row of the table: a model type and the attention features its tiny config exercises."""

    id: str
    model_type: str
    features: tuple[str, ...]  # attention features beyond plain (GQA) softmax attention, as users know them
    config: dict = field(default_factory=dict)  # the tiny test config (AutoConfig.for_model kwargs)
    # config overrides that must change the model's output: proof that the feature matters in the test
    bites: dict = field(default_factory=dict)
    note: str = ""


def _tiny(**kw) -> dict:
    """The shared tiny config with ``kw`` on top; a ``head_dim`` of None leaves it to the family's default."""
    out = {**_TINY, **kw}
    if out.get("head_dim", 0) is None:
        del out["head_dim"]
    return out


SUPPORTED_FAMILIES: tuple[Family, ...] = (
    Family("llama", "llama", (), _tiny()),
    Family("qwen2", "qwen2", ("q/k/v bias",), _tiny()),
    Family("qwen2-window", "qwen2", ("sliding-window layers (use_sliding_window)",),
           _tiny(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
           bites={"sliding_window": 4096}),
    Family("qwen3", "qwen3", ("q/k norm",), _tiny()),
    Family("mistral", "mistral", (), _tiny(sliding_window=None)),
    Family("mistral-window", "mistral", ("sliding window on every layer",), _tiny(sliding_window=WINDOW),
           bites={"sliding_window": 4096}),
    Family("phi3", "phi3", ("fused qkv_proj",), _tiny(head_dim=None, pad_token_id=0)),
    Family("gemma2", "gemma2", ("logit soft-capping", "query_pre_attn_scalar scaling",
                                "alternating sliding-window layers"),
           _tiny(num_hidden_layers=3, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                 final_logit_softcapping=30.0, sliding_window=WINDOW, pad_token_id=0),
           bites={"attn_logit_softcapping": None, "sliding_window": 4096}),
    Family("gemma3", "gemma3_text", ("sliding-window and global layers", "query_pre_attn_scalar scaling",
                                     "q/k norm", "local/global RoPE"),
           _tiny(num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=WINDOW,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
           bites={"sliding_window": 4096}),
    Family("olmo2", "olmo2", ("q/k norm over all heads",), _tiny()),
    Family("granite", "granite", ("attention_multiplier scaling",),
           _tiny(attention_multiplier=0.5, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
           bites={"attention_multiplier": 0.25}),
    Family("deepseek_v3", "deepseek_v3", ("MLA: latent KV cache, qk head dim != v head dim", "low-rank q (q_lora_rank)",
                                          "MoE"),
           _tiny(head_dim=None, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8,
                 qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                 topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32, n_shared_experts=1,
                 rope_interleave=True)),
    Family("deepseek_v3-q", "deepseek_v3", ("MLA without low-rank q (q_lora_rank=None)",),
           _tiny(head_dim=None, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
                 qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                 topk_group=1, first_k_dense_replace=2, moe_intermediate_size=32, n_shared_experts=1,
                 rope_interleave=False)),
    Family("gpt_oss", "gpt_oss", ("attention sinks (a learned logit per head)", "alternating sliding-window layers",
                                  "MoE"),
           _tiny(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, attention_bias=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
                 layer_types=["sliding_attention", "full_attention"]),
           bites={"sliding_window": 4096}),
)

# Model types refused with their reason (a type in neither table is refused as untested).
REFUSED: dict[str, str] = {
    "gemma3": "the multimodal Gemma3 wrapper (vision tower + text model): use a text-only checkpoint (gemma3_text)",
    "llama4": "chunked attention layers",
}

# Layer types (transformers' config.layer_types) whose attention hetmem runs.
LAYER_TYPES = ("full_attention", "sliding_attention")


def supported_model_types() -> list[str]:
    return sorted({f.model_type for f in SUPPORTED_FAMILIES})


def check_model_type(mt: str | None) -> None:
    """Refuse a model type that is not in the table (or is refused by name), in one line."""
    mt = mt or "unknown"
    if mt in REFUSED:
        raise HetmemError(f"model type '{mt}' is not supported: {REFUSED[mt]}")
    if mt not in supported_model_types():
        raise HetmemError(f"model type '{mt}' is not supported: it is not among the families hetmem is tested "
                          f"on ({', '.join(supported_model_types())}); see the README's model-family table")


def check_supported(config) -> None:
    """Refuse, in one line, a model hetmem cannot run exactly. Reads only the config (no weights)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    mt = getattr(config, "model_type", None)
    check_model_type(mt)
    text = config.get_text_config(decoder=True)
    if getattr(text, "use_bidirectional_attention", False):
        raise HetmemError(f"model type '{mt}' is not supported with use_bidirectional_attention "
                          "(hetmem runs causal decoders)")
    if getattr(text, "is_causal", True) is False:
        raise HetmemError(f"model type '{mt}' is not supported with is_causal=False (hetmem runs causal decoders)")
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        try:
            layer_types, _ = get_layer_types_and_kwargs(text)
        except (AttributeError, KeyError, ValueError) as exc:
            raise HetmemError(f"model type '{mt}': cannot tell its layer types ({exc})") from None
    other = sorted(set(layer_types) - set(LAYER_TYPES))
    if other:
        raise HetmemError(f"model type '{mt}' is not supported with layer type(s) {', '.join(other)} "
                          f"(hetmem runs {' and '.join(LAYER_TYPES)} layers)")


# -- the README's support table ---------------------------------------------------------------------------------
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def support_table() -> str:
    """Markdown: one line per supported model type (the features its test rows cover), then the refusals."""
    by_type: dict[str, list[Family]] = {}
    for f in SUPPORTED_FAMILIES:
        by_type.setdefault(f.model_type, []).append(f)
    lines = ["| model type | attention features covered by the test table | status |", "|---|---|---|"]
    for mt, rows in by_type.items():
        feats = [x for f in rows for x in f.features] or ["plain GQA attention"]
        ids = ", ".join(f"`{f.id}`" for f in rows)
        lines.append(f"| `{mt}` | {'; '.join(feats)} | matches transformers eager (test rows {ids}) |")
    for mt, why in REFUSED.items():
        lines.append(f"| `{mt}` | {why} | refused before loading weights |")
    lines.append("| any other type | not in the test table | refused before loading weights |")
    return "\n".join(lines)


def render_readme(text: str) -> str:
    """``text`` with the part between the family markers replaced by the current support table."""
    if BEGIN not in text or END not in text:
        raise HetmemError(f"README has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{support_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    path.write_text(render_readme(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the model-family table into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
