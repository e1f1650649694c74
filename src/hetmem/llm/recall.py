"""Attention-mass recall of a sparse method's selections, measured in decode, per layer.

For every decode step and layer: the true attention mass (dense softmax of the real query against every
cached key, averaged over each GQA group) on the tokens the method selected, divided by the mass of the
oracle top-n tokens for the same n. 1.0 means the selection is as good as exact top-k at that budget.
The dense scores are computed only for this measurement (its time is reported apart from the steps).
"""

from __future__ import annotations

import time

from hetmem.ops.attention_mass import attention_probs, selection_recall, selection_token_mask


class RecallMeter:
    def __init__(self, n_layers: int):
        self.sum = [0.0] * n_layers
        self.n = [0] * n_layers
        self.tokens = [0.0] * n_layers
        self.ms = 0.0

    def measure(self, layer_idx: int, target, layer, selection) -> None:
        """``target``: the step's DecodeTarget (grouped query, scale, soft-cap, sinks). A sliding-window layer
        is measured inside its window (the tokens the model can attend)."""
        if selection is None:
            return
        t0 = time.perf_counter()
        q, L, ws = target.q, layer.length, selection.start
        probs = attention_probs(q, layer.buf_k[:, :, ws:L], target.scale, softcap=target.softcap, sinks=target.sinks)
        mask = selection_token_mask(selection, (q.shape[0], q.shape[1]))[..., ws:L]
        r = selection_recall(probs, mask)
        self.sum[layer_idx] += float(r.mean())
        self.tokens[layer_idx] += float(mask.sum(-1).float().mean())
        self.n[layer_idx] += 1
        self.ms += (time.perf_counter() - t0) * 1e3

    def summary(self) -> dict | None:
        per = [round(s / n, 6) if n else None for s, n in zip(self.sum, self.n)]
        vals = [p for p in per if p is not None]
        if not vals:
            return None
        toks = [t / n for t, n in zip(self.tokens, self.n) if n]
        return {
            "attention_mass_recall": round(sum(vals) / len(vals), 6),
            "recall_per_layer": per,
            "definition": "selected attention mass / oracle top-k mass at the same token count, mean over decode steps and KV heads",
            "selected_tokens_mean": round(sum(toks) / len(toks), 2),
            "decode_steps": max(self.n),
            "measure_ms": round(self.ms, 3),
            "source": "measured",
        }
