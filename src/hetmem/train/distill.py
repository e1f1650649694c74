"""Self-distillation of SeerAttention-R gates and DSA indexers from a frozen model's own attention.

For each text chunk the frozen model runs once (no grad) into a hetmem paged cache while hetmem's attention
hook records every layer's post-RoPE queries and the keys the cache holds (what the methods select on: per
KV head keys, or MLA's latent ``c_kv ++ k_rope`` with the queries absorbed into latent space, see
``llm.arch``), and a forward pre-hook records each attention module's input hidden state. The model's
attention is reproduced exactly: soft-capping, and on sliding-window layers only the window. From those:

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
from hetmem.methods.hmt import hmt_pipeline, init_params, process_segments
from hetmem.methods.seer import identity_gates
from hetmem.methods.shared import model_dims
from hetmem.ops.index_score import index_scores_all


class _CaptureRuntime(attention.SparseRuntime):
    """Records each layer's query (in the cache's key space) and cached keys while attention runs densely."""

    def __init__(self, cache):
        super().__init__(cache=cache)
        self.qk: dict[int, tuple] = {}

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer = self.cache.layers[module.layer_idx]
        attention.check_window(module, layer, kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q = self.latent_query(module, layer, query)
        self.qk[module.layer_idx] = (q.detach().float(), layer.buf_k[:, :, : layer.length].detach().float(), scale,
                                     layer.sliding_window, kwargs.get("softcap"))
        return attention.dense_attention(module, query, key, value, attention_mask, scaling=scale, **kwargs)


@torch.no_grad()
def capture(model, ids: torch.Tensor) -> list[dict]:
    """Per layer: q [B,H_kv,G,T,D], k [B,H_kv,T,D] (post-RoPE, as cached), scale, window, softcap, hidden
    [B,T,hidden] (attention input)."""
    from hetmem.llm.arch import describe
    from hetmem.llm.paged_cache import PagedKVCache

    attention.install(model)
    arch = describe(model)
    cache = PagedKVCache(arch.n_layers, reserve_tokens=ids.shape[1], windows=arch.windows, mla_rank=arch.mla_rank)
    rt = _CaptureRuntime(cache)
    hidden: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs):
        hidden[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None).detach().float()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention.attention_modules(model)]
    try:
        with rt.activate():
            model(input_ids=ids.to(next(model.parameters()).device), past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    out = []
    for i in sorted(rt.qk):
        q, k, scale, window, softcap = rt.qk[i]
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        out.append({"q": q.reshape(B, Hkv, H // Hkv, T, D), "k": k, "scale": scale, "window": window,
                    "softcap": softcap, "hidden": hidden[i]})
    return out


def visible(rows: torch.Tensor, T: int, window: int | None) -> torch.Tensor:
    """``[R, T]``: the keys query position ``rows[r]`` attends (causal; inside a sliding window if any)."""
    ar = torch.arange(T)[None, :]
    vis = ar <= rows[:, None]
    if window is not None:
        vis &= ar > rows[:, None] - window
    return vis


def query_rows(T: int, min_pos: int, max_rows: int) -> torch.Tensor:
    """The query positions trained/evaluated on: from ``min_pos`` on, evenly thinned to ``max_rows``."""
    rows = torch.arange(min(min_pos, T - 1), T)
    if len(rows) > max_rows:
        rows = rows[torch.linspace(0, len(rows) - 1, max_rows).round().long()]
    return rows


@torch.no_grad()
def row_probs(lay: dict, rows: torch.Tensor) -> torch.Tensor:
    """The model's causal attention for query positions ``rows``: ``[B, H_kv, G, R, T]``."""
    q, k = lay["q"][:, :, :, rows], lay["k"]
    T = k.shape[2]
    logits = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * lay["scale"]
    if lay.get("softcap") is not None:
        logits = torch.tanh(logits / lay["softcap"]) * lay["softcap"]
    hidden = ~visible(rows, T, lay.get("window"))
    return torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)


# -- seer -------------------------------------------------------------------------------------------------------
class SeerObjective:
    method = "seer"
    default_lr = 5e-3  # the gates start as identity maps (entries of order 1)

    def __init__(self, model, page_size: int = 16, min_blocks: int = 2, max_rows: int = 256):
        n_layers, n_kv, d = model_dims(model)
        self.P, self.min_blocks, self.max_rows = page_size, min_blocks, max_rows
        init = identity_gates(n_layers, n_kv, d)
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}

    @torch.no_grad()
    def targets(self, data: list[dict]) -> list[dict]:
        P = self.P
        prepared = []
        for lay in data:
            q, k = lay["q"], lay["k"]
            B, Hkv, G, T, D = q.shape
            N = T // P
            rows = query_rows(T, (self.min_blocks + 1) * P, self.max_rows)
            mass = row_probs(lay, rows).mean(2)  # [B,Hkv,R,T]: GQA-group mean
            pooled = k[:, :, : N * P].reshape(B, Hkv, N, P, D).mean(3)
            bmass = mass[..., : N * P].reshape(B, Hkv, len(rows), N, P).sum(-1)  # [B,Hkv,R,N]
            # candidates = what Retrieval ranks: complete blocks before t's block, except the sink block
            # (block 0, always selected); the target is the model's mass over just those, renormalised
            valid = (torch.arange(N)[None, :] < (rows // P)[:, None]) & (torch.arange(N)[None, :] > 0)
            tgt = bmass * valid
            tgt = tgt / tgt.sum(-1, keepdim=True).clamp(min=1e-12)
            prepared.append({"qbar": q.mean(2)[:, :, rows], "pooled": pooled, "target": tgt, "valid": valid,
                             "mass": mass, "rows": rows})
        return prepared

    def logits(self, layer: int, qbar, pooled):
        wq, wk = self.params["wq"][layer], self.params["wk"][layer]
        qg = torch.einsum("bhtd,hde->bhte", qbar, wq)
        kg = torch.einsum("bhnd,hde->bhne", pooled, wk)
        return torch.matmul(qg, kg.transpose(-1, -2)) * qg.shape[-1] ** -0.5

    def layer_loss(self, i: int, p: dict) -> torch.Tensor:
        lg = self.logits(i, p["qbar"], p["pooled"]).masked_fill(~p["valid"], float("-inf"))
        logp = torch.log_softmax(lg, dim=-1)
        t = p["target"]
        return (t * (torch.log(t.clamp(min=1e-12)) - logp.masked_fill(~p["valid"], 0))).sum(-1).mean()

    @torch.no_grad()
    def recall(self, prepared: list[dict], budget: int) -> float:
        """Offline recall: sink block + current block + top blocks by gate score, vs exact top-k tokens."""
        P = self.P
        vals = []
        for i, p in enumerate(prepared):
            mass, tpos = p["mass"], p["rows"]
            T = mass.shape[-1]
            cand = p["valid"]  # the sink block (forced) is not a candidate
            lg = self.logits(i, p["qbar"], p["pooled"]).masked_fill(~cand, float("-inf"))  # [B,Hkv,R,N]
            k_blocks = max(0, budget // P - 2)
            top = lg.topk(min(k_blocks, lg.shape[-1]), dim=-1).indices
            sel_blocks = torch.zeros_like(lg, dtype=torch.bool).scatter_(-1, top, True) & cand
            sel_blocks[..., 0] = True
            tok = F.pad(sel_blocks.repeat_interleave(P, -1), (0, T - sel_blocks.shape[-1] * P))
            ar = torch.arange(T)[None, :]
            tok = (tok | (ar >= (tpos // P * P)[:, None])) & (ar <= tpos[:, None])
            vals.append(_recall(mass, tok))
        return float(torch.stack(vals).mean())

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def meta(self) -> dict:
        return {"page_size": self.P}


# -- dsa --------------------------------------------------------------------------------------------------------
class DSAObjective:
    method = "dsa"
    # The indexer starts from the model's own q/k projections (entries ~1e-2): Adam's first steps at 5e-3 wipe
    # that start out (held-out KL 1.9 -> 31.8 after one step on Qwen2.5-0.5B; recall fell 0.87 -> 0.63 after 40).
    default_lr = 2e-4

    def __init__(self, model, index_heads: int = 4, recent: int = 16, min_pos: int = 32, max_rows: int = 256):
        self.H = index_heads
        self.recent, self.min_pos, self.max_rows = recent, min_pos, max_rows
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in init_indexer(model, index_heads).items()}

    @torch.no_grad()
    def targets(self, data: list[dict]) -> list[dict]:
        prepared = []
        for lay in data:
            T = lay["k"].shape[2]
            rows = query_rows(T, self.min_pos, self.max_rows)
            probs = row_probs(lay, rows)  # [B,Hkv,G,R,T]
            tgt = probs.sum(dim=(1, 2))
            tgt = tgt / tgt.sum(-1, keepdim=True)
            prepared.append({"hidden": lay["hidden"], "target": tgt, "rows": rows, "mass": probs.mean(2),
                             "causal": visible(rows, T, lay.get("window")), "window": lay.get("window"),
                             "scale": self.params["wk"].shape[1] ** -0.5})  # 1/sqrt(index dim)
        return prepared

    def scores(self, layer: int, p: dict):
        w = {k: v[layer] for k, v in self.params.items()}
        h = p["hidden"]
        q, wts = indexer_query(w, h[:, p["rows"]], self.H)
        k = indexer_key(w, h)
        return index_scores_all(q, wts, k)  # [B,R,T]

    def layer_loss(self, i: int, p: dict) -> torch.Tensor:
        lg = (self.scores(i, p) * p["scale"]).masked_fill(~p["causal"], float("-inf"))
        logp = torch.log_softmax(lg, -1).masked_fill(~p["causal"], 0)
        t = p["target"]
        return (t * (torch.log(t.clamp(min=1e-12)) - logp)).sum(-1).mean()

    @torch.no_grad()
    def recall(self, prepared: list[dict], budget: int) -> float:
        vals = []
        for i, p in enumerate(prepared):
            mass, tpos = p["mass"], p["rows"]  # [B,Hkv,R,T]
            T = mass.shape[-1]
            s = self.scores(i, p)  # [B,R,T]
            ar = torch.arange(T)[None, :]
            recent = (ar > (tpos - self.recent)[:, None]) & (ar <= tpos[:, None])
            cand = (ar <= (tpos - self.recent)[:, None]) & p["causal"]
            s = s.masked_fill(~cand, float("-inf"))
            top = s.topk(min(max(0, budget - self.recent), T), dim=-1).indices
            sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True) & cand | recent
            vals.append(_recall(mass, sel.unsqueeze(1).expand(-1, mass.shape[1], -1, -1)))
        return float(torch.stack(vals).mean())

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def meta(self) -> dict:
        return {"index_heads": self.H, "recent": self.recent}


def _loss(objective, prepared: list[dict]) -> float:
    with torch.no_grad():
        return sum(float(objective.layer_loss(i, p)) for i, p in enumerate(prepared)) / len(prepared)


def _recall(mass: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Mean over rows of covered mass / oracle mass of the same number of tokens. mass, sel: [..., T]."""
    covered = (mass * sel).sum(-1)
    n = sel.sum(-1)
    ranked = mass.sort(-1, descending=True).values.cumsum(-1)
    best = ranked.gather(-1, (n - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (covered / best.clamp(min=1e-12)).mean()


# -- hmt --------------------------------------------------------------------------------------------------------
class HMTObjective:
    """HMT's new parameters (memory token, summary prompt, cross-attention projections) trained by next-token
    loss over a chunk read in segments, backpropagating through the segments (the backbone frozen).
    ``chunk_loss`` replaces the capture/targets path of the distillation objectives in ``train``."""

    method = "hmt"
    default_lr = 5e-3

    def __init__(self, model, segment_tokens: int = 128, memory_entries: int = 32, attn_dim: int = 64,
                 sensory_tokens: int = 32):
        self.L, self.N, self.K = segment_tokens, memory_entries, sensory_tokens
        init = init_params(model.config.hidden_size, attn_dim, embed=model.get_input_embeddings().weight)
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        self.model = model

    def segment_nll(self, chunk: torch.Tensor, params: dict | None, entries: int | None = None) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL inside each segment (targets 2..L of every segment) and the target count;
        ``params=None`` runs each segment alone (the floor); ``entries=0`` keeps only the sensory memory."""
        model, L = self.model, self.L
        if params is None:
            segs = [model(input_ids=chunk[:, a : a + L]).logits for a in range(0, chunk.shape[1], L)]
        else:
            n = self.N if entries is None else entries
            segs, _ = process_segments(hmt_pipeline(params, L, n, sensory_tokens=self.K), model, params, chunk, L)
        nll, n = 0.0, 0
        for i, lg in enumerate(segs):
            tgt = chunk[:, i * L : i * L + lg.shape[1]]
            nll = nll + F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), tgt[:, 1:].flatten(), reduction="sum")
            n += tgt[:, 1:].numel()
        return nll, n

    def chunk_loss(self, chunk: torch.Tensor) -> torch.Tensor:
        nll, n = self.segment_nll(chunk, self.params)
        return nll / n

    @torch.no_grad()
    def perplexity(self, chunks: list[torch.Tensor], mode: str) -> float:
        """Held-out perplexity over the same targets: ``segment`` (alone), ``sensory`` (the previous segment's
        last tokens prepended, no memory embeddings), ``hmt`` or ``full`` (whole chunk)."""
        nll, n = 0.0, 0
        for c in chunks:
            if mode == "full":
                lg = self.model(input_ids=c).logits
                keep = torch.ones(c.shape[1], dtype=torch.bool)
                keep[:: self.L] = False  # the same targets as the segment runs: not a segment's first token
                tgt_pos = torch.arange(1, c.shape[1])[keep[1:]]
                nll += float(F.cross_entropy(lg[0, tgt_pos - 1].float(), c[0, tgt_pos], reduction="sum"))
                n += len(tgt_pos)
            else:
                a, b = self.segment_nll(c, None if mode == "segment" else self.params, 0 if mode == "sensory" else None)
                nll += float(a)
                n += b
        return math.exp(nll / n)

    def evaluate(self, chunks: list[torch.Tensor]) -> dict:
        return {"perplexity": round(self.perplexity(chunks, "hmt"), 4)}

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def meta(self) -> dict:
        return {"segment_tokens": self.L, "memory_entries": self.N, "sensory_tokens": self.K}


OBJECTIVES = {"seer": SeerObjective, "dsa": DSAObjective, "hmt": HMTObjective}


def _train_direct(objective, opt, train_chunks, eval_chunks, steps, lr, seq, progress) -> dict:
    from tqdm.auto import tqdm

    ev = eval_chunks[:2]
    before = objective.evaluate(ev)
    t0 = time.perf_counter()
    history = []
    bar = tqdm(range(steps), desc=f"train {objective.method}", unit="step", file=sys.stderr, disable=not progress)
    for s in bar:
        opt.zero_grad()
        with torch.enable_grad():
            loss = objective.chunk_loss(train_chunks[s % len(train_chunks)])
            loss.backward()
        opt.step()
        history.append(round(float(loss.detach()), 5))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if not math.isfinite(history[-1]):
            raise HetmemError(f"training diverged at step {s} (loss {history[-1]}): lower --lr")
    bar.close()
    return {"steps": steps, "lr": lr, "seq_len": seq, "train_ms": round((time.perf_counter() - t0) * 1e3, 1),
            "train_loss": history, "eval": {"untrained": before, "trained": objective.evaluate(ev), "chunks": len(ev),
                                            "source": "measured"}}


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
    if hasattr(objective, "chunk_loss"):  # a loss computed from the chunk directly (hmt), no attention capture
        return _train_direct(objective, opt, train_chunks, eval_chunks, steps, lr, seq, progress)
    eval_budget = eval_budget or seq // 8
    eval_data = [objective.targets(capture(model, c)) for c in eval_chunks[:2]]

    def evaluate():
        loss = sum(_loss(objective, d) for d in eval_data) / len(eval_data)
        rec = sum(objective.recall(d, eval_budget) for d in eval_data) / len(eval_data)
        return loss, rec

    loss0, rec0 = evaluate()
    t0 = time.perf_counter()
    history = []
    bar = tqdm(range(steps), desc=f"train {objective.method}", unit="step", file=sys.stderr, disable=not progress)
    for s in bar:
        data = objective.targets(capture(model, train_chunks[s % len(train_chunks)]))
        opt.zero_grad()
        total = 0.0
        with torch.enable_grad():
            for i, p in enumerate(data):  # layers are independent: one backward each keeps memory small
                loss = objective.layer_loss(i, p) / len(data)
                loss.backward()
                total += float(loss.detach())
        opt.step()
        history.append(round(total, 5))
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
