"""``dense``: the baseline. No memory preparation, no selection; Apply attends over every token
(``methods.shared.DenseAttentionApply``, which also serves the layers a sparse method keeps dense)."""

from __future__ import annotations

from dataclasses import dataclass

from hetmem.methods.base import Method, register
from hetmem.methods.shared import dense_pipeline


@register
@dataclass
class Dense(Method):
    name = "dense"
    family = "baseline"
    low_precision_kv = True  # its steps read the cache through ops.sparse_attention (--kv-dtype bf16|fp16)
    summary = "full attention over the whole context (the baseline)"

    def pipeline(self, device, timer, layer_idx: int = 0):
        return dense_pipeline(device, timer)
