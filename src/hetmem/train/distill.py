"""Self-distillation of SeerAttention-R gates and DSA indexers from a frozen model's own attention.

For each text chunk the frozen model runs once (no grad) while hetmem's attention hook records every
layer's post-RoPE queries and keys and a forward pre-hook records each attention module's input hidden
state. From those:

* ``seer``: target = the model's attention mass per block (complete blocks before the query's block),
  averaged over each GQA group; prediction = softmax of (Q-gate(mean group query)) . (K-gate(avg-pooled
  block keys)); loss = KL(target || prediction).
* ``dsa``: target = attention summed over all heads, L1-normalised, over keys <= t; prediction =
  softmax of sum_h w_h ReLU(q_h . k_t) (scaled by 1/sqrt(D)); loss = KL(target || prediction).

Only the gate/indexer weights get gradients. ``offline_recall`` measures the attention-mass recall of
each estimator's selection against the exact top-k at the same token count, on held-out text.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from hetmem.errors import HetmemError
from hetmem.llm import attention
from hetmem.methods.dsa import INDEXER_KEYS, indexer_key, indexer_query, init_indexer
from hetmem.methods.seer import identity_gates, model_dims
from hetmem.ops.index_score import index_scores_all


class _CaptureRuntime(attention.SparseRuntime):
    """Records each layer's query/key (post-RoPE) while attention runs densely."""

    def __init__(self):
        super().__init__(cache=None)
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        self.qk[module.layer_idx] = (query.detach().float(), key.detach().float(), scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)


@torch.no_grad()
def capture(model, ids: torch.Tensor) -> list[dict]:
    """Per layer: q [B,H,T,D], k [B,Hkv,T,D], scale, hidden [B,T,hidden], probs [B,H,T,T] (causal attention)."""
    attention.install(model)
    rt = _CaptureRuntime()
    hidden: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs):
        hidden[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None).detach().float()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention.attention_modules(model)]
    try:
        with rt.activate():
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    out = []
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in sorted(rt.qk):
        q, k, scale = rt.qk[i]
        B, H, _, D = q.shape
        Hkv = k.shape[1]
        logits = torch.matmul(q.reshape(B, Hkv, H // Hkv, T, D), k.unsqueeze(2).transpose(-1, -2)) * scale
        probs = torch.softmax(logits.masked_fill(~causal.to(q.device), float("-inf")), dim=-1)  # [B,Hkv,G,T,T]
        out.append({"q": q.reshape(B, Hkv, H // Hkv, T, D), "k": k, "scale": scale, "hidden": hidden[i], "probs": probs})
    return out


# -- seer -------------------------------------------------------------------------------------------------------
class SeerObjective:
    method = "seer"

    def __init__(self, model, page_size: int = 16, min_blocks: int = 2):
        n_layers, n_kv, d = model_dims(model)
        self.P, self.min_blocks = page_size, min_blocks
        init = identity_gates(n_layers, n_kv, d)
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}

    def targets(self, data: list[dict]) -> list[dict]:
        P = self.P
        prepared = []
        for lay in data:
            q, k, probs = lay["q"], lay["k"], lay["probs"]
            B, Hkv, G, T, D = q.shape
            N = T // P
            pooled = k[:, :, : N * P].reshape(B, Hkv, N, P, D).mean(3)
            mass = probs.mean(2)[..., : N * P].reshape(B, Hkv, T, N, P).sum(-1)  # [B,Hkv,T,N]
            tpos = torch.arange(T)
            # candidates = what Retrieval ranks: complete blocks before t's block, except the sink block
            # (block 0, always selected); the target is the model's mass over just those, renormalised
            valid = (torch.arange(N)[None, :] < (tpos // P)[:, None]) & (torch.arange(N)[None, :] > 0)
            rows = valid.sum(-1) >= self.min_blocks
            tgt = (mass * valid)[:, :, rows]
            tgt = tgt / tgt.sum(-1, keepdim=True).clamp(min=1e-12)
            prepared.append({"qbar": q.mean(2)[:, :, rows], "pooled": pooled, "target": tgt, "valid": valid[rows],
                             "probs": probs, "rows": rows})
        return prepared

    def logits(self, layer: int, qbar, pooled):
        wq, wk = self.params["wq"][layer], self.params["wk"][layer]
        qg = torch.einsum("bhtd,hde->bhte", qbar, wq)
        kg = torch.einsum("bhnd,hde->bhne", pooled, wk)
        return torch.matmul(qg, kg.transpose(-1, -2)) * qg.shape[-1] ** -0.5

    def loss(self, prepared: list[dict]) -> torch.Tensor:
        total = 0.0
        for i, p in enumerate(prepared):
            lg = self.logits(i, p["qbar"], p["pooled"]).masked_fill(~p["valid"], float("-inf"))
            logp = torch.log_softmax(lg, dim=-1)
            t = p["target"]
            kl = (t * (torch.log(t.clamp(min=1e-12)) - logp.masked_fill(~p["valid"], 0))).sum(-1)
            total = total + kl.mean()
        return total / len(prepared)

    @torch.no_grad()
    def recall(self, prepared: list[dict], budget: int) -> float:
        """Offline recall: sink block + current block + top blocks by gate score, vs exact top-k tokens."""
        P = self.P
        vals = []
        for i, p in enumerate(prepared):
            probs = p["probs"].mean(2)  # [B,Hkv,T,T]
            T = probs.shape[-1]
            tpos = torch.arange(T)[p["rows"]]
            lg = self.logits(i, p["qbar"], p["pooled"])  # [B,Hkv,R,N]
            N = lg.shape[-1]
            cand = p["valid"]  # the sink block (forced) is not a candidate
            k_blocks = max(0, budget // P - 2)
            lg = lg.masked_fill(~cand, float("-inf"))
            top = lg.topk(min(k_blocks, N), dim=-1).indices
            sel_blocks = torch.zeros_like(lg, dtype=torch.bool).scatter_(-1, top, True) & cand
            sel_blocks[..., 0] = True
            tok = sel_blocks.repeat_interleave(P, -1)  # [B,Hkv,R,N*P]
            tok = F.pad(tok, (0, T - tok.shape[-1]))
            cur = (torch.arange(T)[None, :] >= (tpos // P * P)[:, None]) & (torch.arange(T)[None, :] <= tpos[:, None])
            tok = tok | cur
            tok &= torch.arange(T)[None, :] <= tpos[:, None]
            vals.append(_recall(probs[:, :, tpos], tok))
        return float(torch.stack(vals).mean())

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def meta(self) -> dict:
        return {"page_size": self.P}


# -- dsa --------------------------------------------------------------------------------------------------------
class DSAObjective:
    method = "dsa"

    def __init__(self, model, index_heads: int = 4, recent: int = 16, min_pos: int = 32):
        self.H = index_heads
        self.recent, self.min_pos = recent, min_pos
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in init_indexer(model, index_heads).items()}

    def targets(self, data: list[dict]) -> list[dict]:
        prepared = []
        for lay in data:
            probs = lay["probs"]  # [B,Hkv,G,T,T]
            T = probs.shape[-1]
            tgt = probs.sum(dim=(1, 2))
            tgt = tgt / tgt.sum(-1, keepdim=True)
            rows = torch.arange(T) >= self.min_pos
            prepared.append({"hidden": lay["hidden"], "target": tgt[:, rows], "rows": rows,
                             "causal": torch.ones(T, T, dtype=torch.bool).tril()[rows], "probs": probs,
                             "scale": lay["q"].shape[-1] ** -0.5})
        return prepared

    def scores(self, layer: int, p: dict):
        w = {k: v[layer] for k, v in self.params.items()}
        h = p["hidden"]
        q, wts = indexer_query(w, h[:, p["rows"]], self.H)
        k = indexer_key(w, h)
        return index_scores_all(q, wts, k)  # [B,R,T]

    def loss(self, prepared: list[dict]) -> torch.Tensor:
        total = 0.0
        for i, p in enumerate(prepared):
            lg = (self.scores(i, p) * p["scale"]).masked_fill(~p["causal"], float("-inf"))
            logp = torch.log_softmax(lg, -1).masked_fill(~p["causal"], 0)
            t = p["target"]
            total = total + (t * (torch.log(t.clamp(min=1e-12)) - logp)).sum(-1).mean()
        return total / len(prepared)

    @torch.no_grad()
    def recall(self, prepared: list[dict], budget: int) -> float:
        vals = []
        for i, p in enumerate(prepared):
            probs = p["probs"].mean(2)  # [B,Hkv,T,T]
            T = probs.shape[-1]
            tpos = torch.arange(T)[p["rows"]]
            s = self.scores(i, p)  # [B,R,T]
            ar = torch.arange(T)[None, :]
            recent = (ar > (tpos - self.recent)[:, None]) & (ar <= tpos[:, None])
            cand = ar <= (tpos - self.recent)[:, None]
            s = s.masked_fill(~cand, float("-inf"))
            k = min(max(0, budget - self.recent), T)
            top = s.topk(k, dim=-1).indices
            sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True) & cand | recent
            sel = sel.unsqueeze(1).expand(-1, probs.shape[1], -1, -1)
            vals.append(_recall(probs[:, :, tpos], sel))
        return float(torch.stack(vals).mean())

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def meta(self) -> dict:
        return {"index_heads": self.H, "recent": self.recent}


def _recall(mass: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Mean over rows of covered mass / oracle mass of the same number of tokens. mass, sel: [..., T]."""
    covered = (mass * sel).sum(-1)
    n = sel.sum(-1)
    ranked = mass.sort(-1, descending=True).values.cumsum(-1)
    best = ranked.gather(-1, (n - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (covered / best.clamp(min=1e-12)).mean()


OBJECTIVES = {"seer": SeerObjective, "dsa": DSAObjective}


def token_chunks(tokenizer, text: str, seq_len: int, holdout: float = 0.2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split tokenised text into seq_len-token chunks: (training chunks, held-out chunks from the end)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 2:
        raise HetmemError(f"the training text holds {len(ids)} tokens: need at least {2 * seq_len} "
                          f"(two chunks of --seq-len {seq_len})")
    chunks = [torch.tensor([ids[i * seq_len : (i + 1) * seq_len]]) for i in range(n)]
    n_eval = max(1, int(n * holdout))
    return chunks[: n - n_eval], chunks[n - n_eval :]


def train(model, objective, train_chunks, eval_chunks, steps: int, lr: float = 5e-3, eval_budget: int | None = None,
          progress: bool = True, log=None) -> dict:
    """Adam on the gate/indexer weights, one chunk per step (cycling). Returns the measured history."""
    from tqdm.auto import tqdm

    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(objective.params.values(), lr=lr)
    seq = train_chunks[0].shape[1]
    eval_budget = eval_budget or seq // 8
    eval_data = [objective.targets(capture(model, c)) for c in eval_chunks[:2]]

    def evaluate():
        with torch.no_grad():
            loss = sum(float(objective.loss(d)) for d in eval_data) / len(eval_data)
        rec = sum(objective.recall(d, eval_budget) for d in eval_data) / len(eval_data)
        return loss, rec

    loss0, rec0 = evaluate()
    t0 = time.perf_counter()
    history = []
    bar = tqdm(range(steps), desc=f"train {objective.method}", unit="step", file=sys.stderr, disable=not progress)
    for s in bar:
        data = objective.targets(capture(model, train_chunks[s % len(train_chunks)]))
        with torch.enable_grad():
            loss = objective.loss(data)
            opt.zero_grad()
            loss.backward()
        opt.step()
        history.append(round(float(loss.detach()), 5))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
        if not math.isfinite(history[-1]):
            raise HetmemError(f"training diverged at step {s} (loss {history[-1]}): lower --lr")
    bar.close()
    loss1, rec1 = evaluate()
    return {
        "steps": steps, "lr": lr, "seq_len": seq, "train_ms": round((time.perf_counter() - t0) * 1e3, 1),
        "train_loss": history, "eval_budget_tokens": eval_budget,
        "eval": {"untrained": {"kl": round(loss0, 5), "attention_mass_recall": round(rec0, 5)},
                 "trained": {"kl": round(loss1, 5), "attention_mass_recall": round(rec1, 5)},
                 "chunks": len(eval_data), "source": "measured"},
    }
