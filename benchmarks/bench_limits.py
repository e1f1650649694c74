"""How close hetmem's decode is to the machine's memory-bandwidth limit (issue 12), all measured in one run.

The limits are measured first, in the same run and with the same torch threads:
  read bandwidth   a sum over a 2 GiB fp32 tensor (larger than any last-level cache here)
  copy bandwidth   ``dst.copy_(src)`` of 1 GiB (bytes read + written)
  fp32 matmul      2048 x 2048 x 2048

Then, each part selectable with ``--parts``:
  p1   Quest relevancy + top-k (``pipeline.select``: the quest step classes as a decode step runs them) over
       the page min/max at the llama3-8b layer shape (8 KV heads, G=4, D=128, page 16, budget 2k), at 64k,
       256k and 1M tokens: achieved GB/s (page-metadata bytes read / time) / read bandwidth. Target >= 0.8.
  p2   one sparse decode step of one layer (``pipeline.query_and_apply``: relevancy + retrieval + apply over
       the selected pages) at 32k, 128k and 256k with a 2k budget: time / byte-limit time, where the bytes are
       the page metadata plus the selected K/V. Target <= 1.3. Also its speedup over dense SDPA attention
       (``DenseAttentionApply``) at the same length.
  p3   SmolLM2 at 8k: decode ms/token for dense and for quest at 1/8 budget, each / its bandwidth-limit
       ms/token (weights + KV bytes read per token, / read bandwidth). Target <= 1.6. And quest / dense
       decode speed (target >= 1.5), min / median / max over 5 alternating runs. One prefill (whose prompt
       is a whole number of pages) is shared: before each run the cache is rewound to the prompt, so every
       run decodes the same tokens from the same state. With ``--p3-kv-dtypes bf16`` (the default) the same
       prompt's KV is also stored in bf16 (``--kv-dtype``: half the KV bytes; float32 accumulation) and dense and
       quest are measured again on it the same way.
  rss  Qwen prefill of 16k tokens in a child process: peak RSS minus RSS after model load, / KV bytes.
       Target <= 1.3.

Working sets are rotated over copies that together exceed the last-level cache (480 MiB here), so every
figure is a memory figure, not a cache figure. Every time is measured wall time; the limits are measured
too. The machine is shared, and the share of it this process gets changes within seconds, so the read
bandwidth that P1, P2 and P3's ratios divide by is measured *beside each sample*: one sum over a 1 GiB
tensor right before and right after every sample (the one after a sample is the one before the next), the
sample's limit is the mean of the two, and each figure is the median of the per-sample ratios (5 samples;
the up-front limits are kept in the record as before). The record keeps the load average at start and end.
Usage:

    python benchmarks/bench_limits.py [--parts p1,p2,p3,rss] [--threads 1] [--label after] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402

from hetmem.core.timer import StepTimer  # noqa: E402
from hetmem.core.types import DecodeTarget, Memory, Query  # noqa: E402
from hetmem.llm.paged_cache import PagedKVLayer  # noqa: E402
from hetmem.methods import get_method  # noqa: E402

PARTS = ("p1", "p2", "p3", "rss")
LLC_BYTES = 1 << 30  # rotate working sets over at least this many bytes (> the 480 MiB L3 here)
HKV, G, D, P, BUDGET = 8, 4, 128, 16, 2048  # llama3-8b layer shape
GB = 1e9


def median_ms(fn, n: int = 5, min_ms: float = 20.0) -> tuple[float, list[float]]:
    """Median over ``n`` samples of the mean wall ms per call; a sample repeats ``fn`` for >= ``min_ms``."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max((time.perf_counter() - t0) * 1e3, 1e-3)
    inner = max(1, min(500, math.ceil(min_ms / one)))
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        xs.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(xs), xs


class Beside:
    """Read bandwidth measured beside each sample: one sum over a 1 GiB fp32 tensor (larger than the L3), taken
    right before and right after each sample; a sample's bandwidth is the mean of the two. All readings are
    kept (``readings``) for the record."""

    def __init__(self, nbytes: int = LLC_BYTES):
        self.x = torch.rand(nbytes // 4)
        self.x.sum()
        self.last = self.read()
        self.readings = [self.last]

    def read(self) -> float:
        t0 = time.perf_counter()
        self.x.sum()
        return self.x.numel() * 4 / (time.perf_counter() - t0) / GB

    def around(self, fn):
        """Run ``fn()``; return (its result, the read bandwidth beside it in GB/s)."""
        before = self.last
        out = fn()
        self.last = self.read()
        self.readings.append(self.last)
        return out, (before + self.last) / 2

    def summary(self) -> dict:
        xs = self.readings
        return {"n": len(xs), "min": round(min(xs), 2), "median": round(statistics.median(xs), 2),
                "max": round(max(xs), 2)}


def sampled_ms(fn, bw: Beside, n: int = 5, min_ms: float = 20.0) -> tuple[list[float], list[float]]:
    """``n`` samples of the mean wall ms per call (a sample repeats ``fn`` for >= ``min_ms``), each with the read
    bandwidth measured beside it: (ms per sample, GB/s per sample)."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max((time.perf_counter() - t0) * 1e3, 1e-3)
    inner = max(1, min(500, math.ceil(min_ms / one)))

    def sample():
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner

    xs, bws = [], []
    bw.last = bw.read()  # a fresh reading right before the first sample
    for _ in range(n):
        ms, b = bw.around(sample)
        xs.append(ms)
        bws.append(b)
    return xs, bws


def limits(log) -> dict:
    x = torch.rand(1 << 29)  # 2 GiB fp32
    ms, _ = median_ms(lambda: x.sum(), min_ms=0)
    read = x.numel() * 4 / (ms * 1e-3) / GB
    del x
    src, dst = torch.rand(1 << 28), torch.empty(1 << 28)
    ms, _ = median_ms(lambda: dst.copy_(src), min_ms=0)
    copy = 2 * src.numel() * 4 / (ms * 1e-3) / GB
    del src, dst
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    ms, _ = median_ms(lambda: a @ b)
    flops = 2 * 2048**3 / (ms * 1e-3) / 1e9
    out = {"read_GBps": round(read, 2), "copy_GBps": round(copy, 2), "matmul_GFLOPs": round(flops, 1)}
    log(f"limits (measured): read {read:.1f} GB/s (2 GiB sum), copy {copy:.1f} GB/s (read+write), "
        f"fp32 matmul {flops:.0f} GFLOP/s")
    return out


def quest_pipe(timer=None, budget=BUDGET):
    return get_method("quest", budget=budget, page_size=P, dense_layers=0).pipeline(
        "cpu", timer or StepTimer(enabled=False), layer_idx=0)


def _memory(L: int, gen) -> Memory:
    n = L // P
    kmin = torch.randn(1, HKV, n, D, generator=gen)
    kmax = kmin + torch.rand(1, HKV, n, D, generator=gen)
    return Memory(kind="page-minmax", tensors={"kmin": kmin, "kmax": kmax}, n_units=n, unit_size=P,
                  meta={"length": L, "window_start": 0})


def part_p1(lim, log, lengths, bw: Beside) -> dict:
    pipe = quest_pipe()
    rows = []
    log(f"P1 quest relevancy + top-k (pipeline.select), {HKV} KV heads, G={G}, D={D}, page {P}, budget {BUDGET}")
    for L in lengths:
        gen = torch.Generator().manual_seed(L)
        n = L // P
        nbytes = 2 * HKV * (n - 2) * D * 4  # kmin + kmax of the candidate pages (sink and recent are forced)
        copies = [_memory(L, gen) for _ in range(max(1, math.ceil(LLC_BYTES / nbytes)))]
        queries = [Query(vectors=torch.randn(1, HKV, G, D, generator=gen)) for _ in range(len(copies))]
        it = [0]

        def step():
            i = it[0] = (it[0] + 1) % len(copies)
            return pipe.select(copies[i], queries[i])

        xs, bws = sampled_ms(step, bw)
        ms = statistics.median(xs)
        gbps = nbytes / (ms * 1e-3) / GB
        ratios = [nbytes / (x * 1e-3) / GB / b for x, b in zip(xs, bws)]
        ratio = statistics.median(ratios)
        rows.append({"length": L, "ms": round(ms, 4), "GBps": round(gbps, 2), "ratio": round(ratio, 3),
                     "ratio_to_upfront_limit": round(gbps / lim["read_GBps"], 3), "bytes": nbytes,
                     "samples_ms": [round(x, 4) for x in xs], "samples_read_GBps": [round(b, 2) for b in bws],
                     "samples_ratio": [round(r, 3) for r in ratios]})
        log(f"  L={L:>8}: {ms:8.3f} ms  {gbps:6.2f} GB/s  = {ratio:.2f} of the read bandwidth beside each sample "
            f"(median of {len(xs)}; read {statistics.median(bws):.1f} GB/s) (target >= 0.8)")
        del copies
        gc.collect()
    return {"lengths": lengths, "ratio": [r["ratio"] for r in rows], "target": ">= 0.8", "rows": rows}


def _filled_layer(L: int, gen, pipe) -> PagedKVLayer:
    layer = PagedKVLayer(P, pipe, reserve_tokens=L + P)
    chunk = 16384
    for s in range(0, L, chunk):  # chunked, as a prefill fills it (Prepare builds the page min/max)
        t = min(chunk, L - s)
        layer.update(torch.randn(1, HKV, t, D, generator=gen), torch.randn(1, HKV, t, D, generator=gen))
    return layer


def part_p2(lim, log, lengths, bw: Beside) -> dict:
    from hetmem.methods.shared import DenseAttentionApply

    rows = []
    log(f"P2 sparse decode step (pipeline.query_and_apply, one layer), budget {BUDGET}, step timer off")
    for L in lengths:
        gen = torch.Generator().manual_seed(L + 1)
        pipe = quest_pipe()
        layer = _filled_layer(L, gen, pipe)
        kv_bytes = 2 * HKV * L * D * 4
        n_layers = max(1, math.ceil(LLC_BYTES / kv_bytes))
        layers = [layer] + [_filled_layer(L, gen, quest_pipe()) for _ in range(n_layers - 1)]
        n = L // P
        meta_bytes = 2 * HKV * (n - 2) * D * 4
        sel_bytes = 2 * HKV * BUDGET * D * 4
        limit_ms = (meta_bytes + sel_bytes) / (lim["read_GBps"] * GB) * 1e3
        qs = [torch.randn(1, HKV, G, D, generator=gen) for _ in range(8)]
        scale = D**-0.5
        dense = DenseAttentionApply()
        it = [0]

        def sparse():
            i = it[0] = (it[0] + 1) % 8
            ly = layers[i % len(layers)]
            q = qs[i]
            return ly.pipeline.query_and_apply(ly.memory, Query(vectors=q, meta={"scale": scale}), ly,
                                               DecodeTarget(q, scale))

        def dense_step():
            i = it[0] = (it[0] + 1) % 8
            ly = layers[i % len(layers)]
            return dense.apply(ly, None, DecodeTarget(qs[i], scale))

        xs, bws = sampled_ms(sparse, bw)
        ms = statistics.median(xs)
        nb = meta_bytes + sel_bytes
        ratios = [x / (nb / (b * GB) * 1e3) for x, b in zip(xs, bws)]
        ratio = statistics.median(ratios)
        dms, _ = median_ms(dense_step)
        rows.append({"length": L, "ms": round(ms, 4), "limit_ms": round(nb / (statistics.median(bws) * GB) * 1e3, 4),
                     "ratio": round(ratio, 3), "ratio_to_upfront_limit": round(ms / limit_ms, 3),
                     "dense_ms": round(dms, 4), "speedup_over_dense": round(dms / ms, 2),
                     "bytes": nb, "samples_ms": [round(x, 4) for x in xs],
                     "samples_read_GBps": [round(b, 2) for b in bws], "samples_ratio": [round(r, 3) for r in ratios]})
        log(f"  L={L:>7}: step {ms:7.3f} ms -> {ratio:5.2f}x the byte-limit time at the read bandwidth beside each "
            f"sample (median of {len(xs)}; read {statistics.median(bws):.1f} GB/s) (target <= 1.3); "
            f"dense SDPA {dms:8.3f} ms -> {dms / ms:5.1f}x faster")
        del layers, layer
        gc.collect()
    return {"lengths": lengths, "ratio": [r["ratio"] for r in rows],
            "speedup_over_dense": [r["speedup_over_dense"] for r in rows], "target": "<= 1.3", "rows": rows}


def part_p3(lim, log, model_name: str, tokens: int, new_tokens: int, repeats: int, kv_dtypes=(), bw: Beside = None,
            weight_dtypes=()) -> dict:
    from hetmem.llm import attention
    from hetmem.llm.arch import describe
    from hetmem.llm.generate import KV_DTYPES, decode_tokens
    from hetmem.llm.models import load_model
    from hetmem.llm.paged_cache import PagedKVCache
    from hetmem.llm.prompt import build_prompt_ids
    from hetmem.tasks.haystack import passkey_task

    bw = bw or Beside()
    lm = load_model(model_name)
    model = lm.model
    attention.install(model)
    task = passkey_task(lm.tokenizer, tokens + 512, seed=1)
    ids = build_prompt_ids(lm.tokenizer, task.context, task.question)[:, -tokens:]
    prompt = ids.shape[1] // P * P
    ids = ids[:, -prompt:]
    arch = describe(model)
    nl = arch.n_layers
    quest = get_method("quest", budget=prompt // 8, page_size=P)
    dense = get_method("dense")
    timer = StepTimer()
    pipes = {"quest": [quest.pipeline("cpu", timer, layer_idx=i) for i in range(nl)],
             "dense": [dense.pipeline("cpu", timer, layer_idx=i) for i in range(nl)]}
    cache = PagedKVCache(nl, P, pipes["quest"], reserve_tokens=prompt + new_tokens + P, windows=arch.windows)
    rt = attention.SparseRuntime(cache, "cpu")
    log(f"P3 {lm.name}: prefill {prompt} tokens once (quest memory built), then {repeats} alternating runs of "
        f"{new_tokens} decode tokens each for dense and quest budget={prompt // 8}")
    t0 = time.perf_counter()
    with torch.inference_mode(), rt.activate():
        rt.prefill = True
        for s in range(0, prompt, 1024):
            logits = model(input_ids=ids[:, s : s + 1024], past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits
        rt.prefill = False
    log(f"  prefill {time.perf_counter() - t0:.1f} s")
    timer.phase = "decode"

    def run(name, c=cache, r=rt):
        for layer, pipe in zip(c.layers, pipes[name]):
            layer.pipeline = pipe
            layer.length = layer.seen = prompt  # rewind: decode tokens start a new page, so it is exact
        with torch.inference_mode(), r.activate():
            toks, ms = decode_tokens(model, c, logits, new_tokens, eos=set())
        return ms / (len(toks) - 1), toks

    def kv_copy(kvd):
        # The same prompt's KV stored in another dtype: copied from the float32 cache (its Prepare runs over it).
        kc = PagedKVCache(nl, P, pipes["quest"], reserve_tokens=prompt + new_tokens + P, windows=arch.windows,
                          kv_dtype=KV_DTYPES[kvd])
        for dst, src in zip(kc.layers, cache.layers):
            dst.copy_prefix(src)
        return kc, attention.SparseRuntime(kc, "cpu")

    def alternate(c, r):
        """Warm-up, then ``repeats`` alternating runs of dense and quest, each with the read bandwidth beside it."""
        run("dense", c, r), run("quest", c, r)
        per, bws, toks = {"dense": [], "quest": []}, {"dense": [], "quest": []}, {}
        bw.last = bw.read()
        for i in range(repeats):
            for name in (("dense", "quest") if i % 2 == 0 else ("quest", "dense")):
                (ms, toks[name]), b = bw.around(lambda name=name: run(name, c, r))
                per[name].append(ms)
                bws[name].append(b)
            log(f"  run {i + 1}/{repeats}: dense {per['dense'][-1]:7.2f} ms/token, quest {per['quest'][-1]:7.2f} "
                f"ms/token (read {bws['dense'][-1]:.1f} / {bws['quest'][-1]:.1f} GB/s beside them)")
        return per, bws, toks

    def weight_bytes():  # every weight once (tied embeddings counted once)
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    e = next(model.parameters()).element_size()
    kv_tok = 2 * arch.kv_heads * arch.key_dim * e  # K and V of one token in one layer, in the model's dtype
    n_pages = prompt // P
    dense_kv = nl * prompt * kv_tok
    bp = quest.budget_pages
    sparse_layers = nl - quest.dense_layers
    quest_kv = (quest.dense_layers * prompt * kv_tok
                + sparse_layers * (bp * P + n_pages - 2) * kv_tok)  # selected K/V + kmin/kmax of the candidates

    def rows(per, bws, w_bytes, kv_scale=1.0):
        """Per name: median ms/token and the median of the per-run ratios to the limit beside each run."""
        out = {}
        for name, kvb in (("dense", dense_kv), ("quest", quest_kv)):
            kvb = int(kvb * kv_scale)
            nb = w_bytes + kvb
            ratios = [x / (nb / (b * GB) * 1e3) for x, b in zip(per[name], bws[name])]
            med = statistics.median(per[name])
            out[name] = {"ms_per_token": round(med, 3), "samples": [round(x, 3) for x in per[name]],
                         "samples_read_GBps": [round(b, 2) for b in bws[name]],
                         "samples_ratio": [round(x, 3) for x in ratios],
                         "limit_ms_per_token": round(nb / (statistics.median(bws[name]) * GB) * 1e3, 3),
                         "limit_ms_per_token_upfront": round(nb / (lim["read_GBps"] * GB) * 1e3, 3),
                         "kv_bytes_read": kvb, "weights_bytes": w_bytes, "ratio": round(statistics.median(ratios), 3)}
        r = [d / q for d, q in zip(per["dense"], per["quest"])]
        out["quest_over_dense"] = {"min": round(min(r), 3), "median": round(statistics.median(r), 3),
                                   "max": round(max(r), 3), "n": len(r),
                                   "at_limit": round((w_bytes + dense_kv * kv_scale) / (w_bytes + quest_kv * kv_scale),
                                                     3)}
        return out

    def say(tag, row):
        for name in ("dense", "quest"):
            x = row[name]
            log(f"  {name:<5}{tag}: {x['ms_per_token']:7.2f} ms/token -> {x['ratio']:.2f}x the bandwidth-limit ms/token "
                f"beside each run (median of {len(x['samples'])}; limit {x['limit_ms_per_token']:.2f} ms/token) "
                f"(target <= 1.6)")
        q = row["quest_over_dense"]
        log(f"  quest speed / dense speed{tag}: min {q['min']:.2f}, median {q['median']:.2f}, max {q['max']:.2f} "
            f"(target >= 1.5; at the bandwidth limit it would be {q['at_limit']:.2f})")

    kv_caches = {kvd: kv_copy(kvd) for kvd in kv_dtypes}
    w_bytes = weight_bytes()
    per, bws, toks = alternate(cache, rt)
    out = {"model": lm.name, "prompt_tokens": prompt, "new_tokens": new_tokens, "repeats": repeats,
           "weights_bytes": w_bytes, "read_GBps": lim["read_GBps"], **rows(per, bws, w_bytes)}
    out["same_tokens"] = toks.get("dense") == toks.get("quest")
    say("", out)
    out["kv_dtypes"] = {}
    for kvd, (kc, krt) in kv_caches.items():
        kper, kbws, _ = alternate(kc, krt)
        row = rows(kper, kbws, w_bytes, KV_DTYPES[kvd].itemsize / e)
        for name in ("dense", "quest"):
            row[name]["speedup_over_model_dtype"] = round(out[name]["ms_per_token"] / row[name]["ms_per_token"], 3)
        say(f" KV {kvd}", row)
        out["kv_dtypes"][kvd] = row
    del kv_caches
    gc.collect()
    # The weights (and the KV) in a 16-bit dtype (``hetmem run --dtype bf16``): the model is cast after the float32
    # runs, the same prompt's KV copied into a cache of that dtype; torch runs bf16 linears through oneDNN (AMX
    # where the CPU has it).
    out["weight_dtypes"] = {}
    for wd in weight_dtypes:
        model.to(KV_DTYPES[wd])
        kc, krt = kv_copy(wd)
        wb = weight_bytes()
        wper, wbws, wtoks = alternate(kc, krt)
        row = rows(wper, wbws, wb, KV_DTYPES[wd].itemsize / e)
        row["same_tokens_as_fp32"] = {n: wtoks.get(n) == toks.get(n) for n in ("dense", "quest")}
        say(f" weights+KV {wd}", row)
        out["weight_dtypes"][wd] = row
        del kc, krt
        gc.collect()
    return out


RSS_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from hetmem.llm.models import load_model
from hetmem.llm.generate import generate
from hetmem.methods import get_method
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
lm = load_model(sys.argv[1]); n = int(sys.argv[2])
ids = torch.randint(1000, 20000, (1, n), generator=torch.Generator().manual_seed(0))
# The weights are loaded as a file mapping: each page counts in RSS only once read. Read them all before the
# baseline, so that the first forward's page faults (the weights, not prefill's memory) are not charged to prefill.
with torch.no_grad():
    for p in lm.model.parameters():
        p.sum()
# The compiled decode ops are loaded (torch.utils.cpp_extension, setuptools, the .so) by the first generate:
# load them before the baseline too, so that their import is not charged to prefill either.
from hetmem.ops import fast
fast.available(torch.zeros(1))
import gc; gc.collect()
base = rss('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to now
t0 = time.perf_counter()
res = generate(lm.model, ids, get_method('dense'), 1, progress=False)
print(json.dumps({"model": lm.name, "tokens": n, "rss_after_load": base, "peak": rss('VmHWM:'),
                  "kv_bytes": res.memory["kv_bytes"], "prefill_s": round(time.perf_counter() - t0, 1)}))
"""


def part_rss(log, model_name: str, tokens: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-c", RSS_CHILD, model_name, str(tokens), str(threads)], capture_output=True,
                       text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"rss child failed: {p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["ratio"] = round((r["peak"] - r["rss_after_load"]) / r["kv_bytes"], 3)
    log(f"RSS {r['model']} prefill {tokens} tokens ({r['prefill_s']} s): peak - after load = "
        f"{(r['peak'] - r['rss_after_load']) / 2**20:.0f} MiB, KV {r['kv_bytes'] / 2**20:.0f} MiB -> {r['ratio']:.2f}x "
        f"(target <= 1.3)")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--label", default="", help="a name for this run in the record (e.g. before, after)")
    ap.add_argument("--p1-lengths", default="65536,262144,1048576")
    ap.add_argument("--p2-lengths", default="32768,131072,262144")
    ap.add_argument("--model", default="smollm2", help="P3's model")
    ap.add_argument("--tokens", type=int, default=8192, help="P3's prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--p3-kv-dtypes", default="bf16", help="P3 also decodes with the KV stored in these dtypes "
                    "(comma-separated bf16,fp16; empty: none)")
    ap.add_argument("--p3-weight-dtypes", default="bf16", help="P3 also decodes with the weights and KV in these "
                    "dtypes (hetmem run --dtype; comma-separated bf16,fp16; empty: none)")
    ap.add_argument("--rss-model", default="qwen")
    ap.add_argument("--rss-tokens", type=int, default=16384)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    ap.add_argument("--no-record", action="store_true", help="do not append a record to benchmarks/results")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    bad += [x for x in (a.p3_kv_dtypes + "," + a.p3_weight_dtypes).split(",")
            if x.strip() and x.strip() not in ("bf16", "fp16", "fp32")]
    if bad or a.threads < 1 or a.repeats < 1 or a.new_tokens < 2:
        ap.error(f"unknown part(s) {bad}" if bad else "--threads and --repeats must be >= 1, --new-tokens >= 2")
    torch.set_num_threads(a.threads)
    rec = Record()
    rec.setting(parts=parts, threads=a.threads, label=a.label, p1_lengths=a.p1_lengths, p2_lengths=a.p2_lengths,
                model=a.model, tokens=a.tokens, new_tokens=a.new_tokens, repeats=a.repeats,
                p3_kv_dtypes=a.p3_kv_dtypes, p3_weight_dtypes=a.p3_weight_dtypes, rss_model=a.rss_model,
                rss_tokens=a.rss_tokens, shape={"kv_heads": HKV, "group": G, "head_dim": D, "page": P,
                                                "budget": BUDGET})

    def log(msg):
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    try:
        from hetmem.ops.fast import backend
        kernels = backend()
    except ImportError:  # before issue 12: plain torch ops only
        kernels = {"relevancy": "torch", "sparse_attention": "torch"}
    log(f"threads {a.threads}; load average {os.getloadavg()[0]:.2f}; kernels: {kernels}")
    rec.detail("kernels", kernels)
    lim = limits(log)
    bw = Beside() if set(parts) & {"p1", "p2", "p3"} else None
    out = {"threads": a.threads, "label": a.label, "limits": lim, "time_source": "measured",
           "limit_beside_samples": "read bandwidth measured before and after every P1/P2/P3 sample; each ratio is "
                                   "the median of per-sample ratios"}
    rec.figure("read_bandwidth", lim["read_GBps"], "GB/s").figure("copy_bandwidth", lim["copy_GBps"], "GB/s")
    rec.figure("fp32_matmul", lim["matmul_GFLOPs"], "GFLOP/s")
    if "p1" in parts:
        out["p1"] = part_p1(lim, log, [int(x) for x in a.p1_lengths.split(",")], bw)
        for L, r in zip(out["p1"]["lengths"], out["p1"]["ratio"]):
            rec.figure(f"p1_{L}", r, "fraction of read bandwidth")
    if "p2" in parts:
        out["p2"] = part_p2(lim, log, [int(x) for x in a.p2_lengths.split(",")], bw)
        for L, r, s in zip(out["p2"]["lengths"], out["p2"]["ratio"], out["p2"]["speedup_over_dense"]):
            rec.figure(f"p2_{L}", r, "x byte-limit time").figure(f"p2_speedup_{L}", s, "x dense SDPA")
    if "p3" in parts:
        r = part_p3(lim, log, a.model, a.tokens, a.new_tokens, a.repeats,
                    [x.strip() for x in a.p3_kv_dtypes.split(",") if x.strip()], bw,
                    [x.strip() for x in a.p3_weight_dtypes.split(",") if x.strip()])
        out["p3_dense"] = {"length": r["prompt_tokens"], "ratio": r["dense"]["ratio"], **r["dense"]}
        out["p3_quest"] = {"length": r["prompt_tokens"], "ratio": r["quest"]["ratio"], **r["quest"]}
        out["quest_over_dense"] = {"length": r["prompt_tokens"], **r["quest_over_dense"]}
        out["p3_detail"] = {k: v for k, v in r.items() if k not in ("dense", "quest", "quest_over_dense")}
        rec.figure("p3_dense", r["dense"]["ratio"], "x bandwidth-limit ms/token")
        rec.figure("p3_quest", r["quest"]["ratio"], "x bandwidth-limit ms/token")
        rec.figure("p3_dense_ms_per_token", r["dense"]["ms_per_token"], "ms/token")
        rec.figure("p3_quest_ms_per_token", r["quest"]["ms_per_token"], "ms/token")
        rec.figure("quest_over_dense", r["quest_over_dense"]["median"], "x dense decode speed")

        def p3_variant(tag: str, row: dict) -> None:  # a P3 run with another KV or weight dtype: its keys
            out[f"p3_{tag}"] = {"length": r["prompt_tokens"], **row}
            for m in ("dense", "quest"):
                rec.figure(f"p3_{m}_{tag}_ms_per_token", row[m]["ms_per_token"], "ms/token")
                rec.figure(f"p3_{m}_{tag}", row[m]["ratio"], "x bandwidth-limit ms/token")
            rec.figure(f"quest_over_dense_{tag}", row["quest_over_dense"]["median"], "x dense decode speed")

        for kvd, row in r["kv_dtypes"].items():
            p3_variant(f"kv_{kvd}", row)
        for wd, row in r["weight_dtypes"].items():
            p3_variant(f"weights_{wd}", row)
            rec.figure(f"quest_over_dense_weights_{wd}_at_limit", row["quest_over_dense"]["at_limit"],
                       "x dense decode speed", source="modelled")
    if bw is not None:
        out["read_GBps_beside_samples"] = bw.summary()
        rec.figure("read_bandwidth_beside_samples", out["read_GBps_beside_samples"]["median"], "GB/s")
        del bw.x
    if "rss" in parts:
        r = part_rss(log, a.rss_model, a.rss_tokens, a.threads)
        out["prefill_rss_ratio"] = {"length": a.rss_tokens, "ratio": r["ratio"], **r}
        rec.figure("prefill_rss_ratio", r["ratio"], "x KV bytes")
    rec.detail("result", out)
    if not a.no_record:
        rec.write(ok=True)
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
