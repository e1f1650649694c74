"""Generate benchmarks/RESULTS.md and the README's (and docs') result blocks from benchmarks/results/*.jsonl.

The one way measured (and modelled) figures reach the documentation: every benchmark appends a record
(benchmarks/_record.py); this script renders

* ``benchmarks/RESULTS.md`` whole: per benchmark, every figure of its latest record, with where it ran;
* in ``README.md`` and ``docs/*.md``, only what lies between ``<!-- results:NAME:begin -->`` and
  ``<!-- results:NAME:end -->``, from the block renderer NAME below. Text outside the markers is left
  alone, and it must not type figures by hand: it points to a block instead.

Every generated table says the command, commit, date, torch threads and load of the record it came
from. ``tests/test_results_docs.py`` fails when a committed document differs from what this script
generates from the committed records.

    python benchmarks/make_results.py            # rewrite the documents
    python benchmarks/make_results.py --check    # exit 1 and name the stale files, write nothing
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import ROOT, read_records  # noqa: E402

RESULTS = "benchmarks/results"
MARK = re.compile(r"<!-- results:([a-z0-9_-]+):begin -->\n(.*?)<!-- results:\1:end -->", re.S)
BEGIN = re.compile(r"<!-- results:([a-z0-9_-]+):(begin|end) -->")

# RESULTS.md order: (bench, what it measures, how to run it)
BENCHES = [
    ("record_contextual", "memagent answers a passkey through its bounded text memory (context 4x the memory)",
     "python benchmarks/record_contextual.py"),
    ("bench_hmt_perplexity", "HMT held-out perplexity: segment alone vs trained HMT vs full context (SmolLM2)",
     "python benchmarks/bench_hmt_perplexity.py"),
    ("record_demo", "`hetmem demo --json`: passkey in essays, dense vs quest at a quarter-context budget",
     "python benchmarks/record_demo.py"),
    ("record_profile", "`hetmem profile` kernel sweep at the llama3-8b shape, then `hetmem plan` on it",
     "python benchmarks/record_profile.py"),
    ("bench_profiler_overhead", "the same SmolLM2 generation with and without the profiler's timer and counters",
     "python benchmarks/bench_profiler_overhead.py"),
    ("bench_quest_budget", "Quest Apply vs dense decode attention at several budgets, kernel level and end to end",
     "python benchmarks/bench_quest_budget.py"),
    ("record_methods", "every in-model method on one passkey task: answer, decode time, KV bytes",
     "python benchmarks/record_methods.py"),
    ("bench_limits", "decode against the machine's measured limits (issue 12): relevancy+top-k, sparse step, "
     "end to end, prefill RSS", "python benchmarks/bench_limits.py"),
    ("bench_flex", "sparse decode attention three ways: C++ page attention, flex_attention (block mask), an "
     "inductor-compiled gather-attend", "python benchmarks/bench_flex.py"),
    ("bench_compile", "torch.compile of the decoder's MLP + norms around hetmem's attention hook; one-pass DSA/seer "
     "relevancy vs torch", "python benchmarks/bench_compile.py"),
    ("bench_bm25", "hetmem's BM25 scoring + top-k vs the `bm25s` library", "python benchmarks/bench_bm25.py"),
    ("bench_dense_search", "hetmem's dense search vs a plain `faiss.IndexFlatIP`",
     "python benchmarks/bench_dense_search.py"),
    ("eval_rag_qa", "RAG answer accuracy with a real model on invented facts", "python benchmarks/eval_rag_qa.py"),
    ("bench_gate_training", "attention-mass recall of trained vs untrained SeerAttention-R gates and DSA indexers",
     "python benchmarks/bench_gate_training.py"),
    ("model_accuracy", "hetmem's device model (modelled) vs measured step times on this host",
     "python benchmarks/model_accuracy.py"),
    ("bench_disaggregated", "memory nodes as Ray actors: call overhead, link, decode per layout, bytes per step",
     "python benchmarks/bench_disaggregated.py"),
    ("bench_serve", "`hetmem serve` under load: 1 sequential vs concurrent clients, and a memory node SIGKILLed",
     "python benchmarks/bench_serve.py"),
    ("bench_engine", "continuous-batching engine: tokens/s of 1 sequence vs 16 concurrent ones on SmolLM2 (page pool)",
     "python benchmarks/bench_engine.py"),
    ("bench_kvquant_passkey", "kvquant (KIVI) and h2o next to dense on the passkey: accuracy, KV bytes, attention "
     "peak extra memory", "python benchmarks/bench_kvquant_passkey.py --runs 4096:1 --h2o 1024 --threads 1"),
]


# --------------------------------------------------------------------------------------------------
# records


class Records:
    """The committed records under ``root/benchmarks/results``, read once."""

    def __init__(self, root: Path = ROOT):
        self.root = Path(root)
        self.dir = self.root / RESULTS
        self._cache: dict[str, list[dict]] = {}

    def benches(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.jsonl")) if self.dir.is_dir() else []

    def all(self, bench: str) -> list[dict]:
        if bench not in self._cache:
            p = self.dir / f"{bench}.jsonl"
            self._cache[bench] = read_records(p) if p.exists() else []
        return self._cache[bench]

    def latest(self, bench: str, where=None) -> dict | None:
        recs = [r for r in self.all(bench) if where is None or where(r)]
        return recs[-1] if recs else None


def provenance(rec: dict) -> str:
    """One line: what ran, at which commit, when, where, with how many threads, under what load."""
    g = rec["git"]
    commit = f"`{g['commit'][:10]}`" if g.get("commit") else "an unknown commit"
    ch = g.get("changed") or []
    dirty = (f" with uncommitted changes ({', '.join(ch[:3])}{', ...' if len(ch) > 3 else ''})" if g.get("dirty") else "")
    m = rec["machine"]
    ld = rec["load1"]
    return (f"Recorded by `{rec['command']}` at commit {commit}{dirty}, {rec['date'].replace('T', ' ').rstrip('Z')} UTC; "
            f"{m['cpu']}, {m['cores_available']} of {m['cpu_count']} cores available, "
            f"{rec['torch_threads']} torch thread{'s' if rec['torch_threads'] != 1 else ''}, torch {rec['versions']['torch']}; "
            f"1-minute load average {ld['start']} at start, {ld['end']} at end.")


def short_provenance(rec: dict) -> str:
    g = rec["git"]
    return (f"`{(g.get('commit') or '?')[:7]}`{'+dirty' if g.get('dirty') else ''}, {rec['date'][:10]}, "
            f"{rec['torch_threads']} thr, load {rec['load1']['start']}→{rec['load1']['end']}")


def v(rec: dict, name: str):
    f = rec["figures"].get(name)
    return None if f is None else f["value"]


def fmt(x, nd: int = 2, pct: bool = False) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x:.{nd}f}%"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{nd}f}"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def missing(bench: str) -> str:
    cmd = dict((b, c) for b, _, c in BENCHES).get(bench, f"python benchmarks/{bench}.py")
    return f"*No recorded run of `{bench}` yet: run `{cmd}`, then `python benchmarks/make_results.py`.*"


def _header(bench: str) -> str:
    return f"<!-- generated by benchmarks/make_results.py from {RESULTS}/{bench}.jsonl: do not edit by hand -->"


# --------------------------------------------------------------------------------------------------
# README / docs blocks: name -> (bench, render(rec) -> markdown)


def block_demo(rec: dict) -> str:
    from hetmem.profiling.report import step_table

    d = rec["details"]["demo"]
    t = d["task"]
    lines = [f"Hid passkey {t['passkey']} at depth {t['depth']:.0%} of {t['tokens']} tokens of essays."]
    for label, r in d["runs"].items():
        lines.append(f"{label:<22} answer: {r['answer']!r:<40} {'correct' if r['correct'] else 'WRONG'}")
    first = next(iter(d["runs"].values()))
    lines += ["", f"prompt: {first['tokens']['prompt']} tokens, model {d['model']} ({first['dtype']}, {first['device']})",
              step_table(d["runs"])]
    return "\n".join([f"`hetmem {' '.join(rec['settings']['hetmem_argv'])}`:", "", "```", *lines, "```", "",
                      provenance(rec)])


def _profile_rows(rec: dict):
    runs = rec["details"]["runs"]
    lengths = sorted({int(k.split("@")[1]) for k in runs})
    methods = list(dict.fromkeys(k.split("@")[0] for k in runs))
    return methods, lengths


def block_profile(rec: dict) -> str:
    methods, lengths = _profile_rows(rec)
    s = rec["settings"]
    head = "| method | context | decode s/token | attention (Apply) share | memory-processing overhead | relevancy share | vs dense |"
    lines = [f"`hetmem {' '.join(s['hetmem_profile_argv'])}` (kernel sweep; times measured, one layer of each kind "
             "timed and scaled to the model's layers):", "",
             head, "|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        for L in lengths:
            k = f"{m}@{L}"
            tok = v(rec, f"{k}.decode_ms_per_token")
            if tok is None:
                lines.append(f"| {m} | {L:,} | skipped: {rec['details'].get(f'skipped.{k}', '?')} | | | | |")
                continue
            dense = v(rec, f"dense@{L}.decode_ms_per_token")
            attn = (v(rec, f"{k}.apply.ms_per_token") or 0.0) / tok
            rel = (v(rec, f"{k}.relevancy.ms_per_token") or 0.0) / tok
            ratio = "" if m == "dense" or not dense else f"{dense / tok:.2f}x faster" if dense >= tok else f"{tok / dense:.2f}x slower"
            mp = "–" if m == "dense" else fmt(v(rec, f"{k}.overhead"), 1, True)
            rs = "–" if m == "dense" else fmt(rel, 1, True)
            lines.append(f"| {m} | {L:,} | {tok / 1e3:.2f} | {fmt(attn, 1, True)} | {mp} | {rs} | {ratio} |")
    lines += ["", "Memory-processing overhead = (prepare + relevancy + retrieval + apply.gather) / decode time; "
              "attention share = Apply / decode time (for dense, all of its attention). " + provenance(rec)]
    return "\n".join(lines)


def block_plan(rec: dict) -> str:
    table = rec["details"].get("plan_table")
    if not table:
        return missing("record_profile")
    return "\n".join([f"`{rec['details']['plan_command']}` on the profile above (every figure **modelled**):", "",
                      "```", table, "```", "", provenance(rec)])


def block_profiler_overhead(rec: dict) -> str:
    s = rec["settings"]
    cpu, wall, dec = v(rec, "cpu_ratio"), v(rec, "wall_ratio"), v(rec, "decode_wall_ratio")
    return "\n".join([
        f"| run | CPU time with / without | wall time with / without | decode wall with / without | direct cost per step call | direct cost share |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {s.get('model_name', s['model'])}, {s['method']} (budget {s['budget']}), {s['length']} prompt tokens + "
        f"{s['new_tokens']} decoded, {s['repeats']} alternating pairs | {cpu:.4f} ({100 * (cpu - 1):+.1f}%) "
        f"| {wall:.4f} ({100 * (wall - 1):+.1f}%) | {dec:.4f} ({100 * (dec - 1):+.1f}%) "
        f"| {v(rec, 'direct_us_per_call'):.2f} us | {fmt(v(rec, 'direct_share'), 2, True)} |",
        "", "All measured (target: CPU-time ratio <= 1.03). " + provenance(rec)])


def block_bm25(rec: dict) -> str:
    s = rec["settings"]
    base = rec["details"]["baseline"]
    n = s["queries_used"]
    return "\n".join([
        "| passages | queries | same top-k (identical ids / up to ties) | ours | bm25s `get_scores`+top-k | bm25s `retrieve` | ratio (fastest bm25s / ours) | build: ours / bm25s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
        f"| {s['passages']:,} | {n} | {v(rec, 'topk_identical')}/{n} / {v(rec, 'topk_identical_up_to_ties')}/{n} "
        f"| {v(rec, 'query_us.ours'):.0f} us | {v(rec, 'query_us.bm25s.get_scores+topk'):.0f} us "
        f"| {v(rec, 'query_us.bm25s.retrieve'):.0f} us | **{v(rec, 'ratio'):.2f}x** ({base}) "
        f"| {v(rec, 'build_ms.ours'):.0f} / {v(rec, 'build_ms.bm25s'):.0f} ms |",
        "", f"k = {s['k']}, k1 = 1.2, b = 0.75, median of {s['repeats']} interleaved passes, all measured. "
        + provenance(rec)])


def block_dense_search(rec: dict) -> str:
    s = rec["settings"]
    emb = v(rec, "embed_query_ms.all-MiniLM-L6-v2")
    return "\n".join([
        "| vectors | queries | same ids | ours | plain `faiss.IndexFlatIP` | ratio (faiss / ours) | one MiniLM query embedding |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['passages']:,} x {s['dim']} | {s['queries']} | {v(rec, 'same_ids')}/{s['queries']} "
        f"| {v(rec, 'query_ms.ours'):.2f} ms | {v(rec, 'query_ms.faiss.IndexFlatIP'):.2f} ms | **{v(rec, 'ratio'):.2f}x** "
        f"| {'–' if emb is None else f'{emb:.1f} ms'} |",
        "", f"k = {s['k']}, faiss {s['faiss_version']} with {s['faiss_threads']} thread(s), median of {s['repeats']} "
        "interleaved passes, all measured. " + provenance(rec)])


def block_rag_qa(rec: dict) -> str:
    s = rec["settings"]
    rows = ["| method | model | right | answer passage in the prompt | s/question |", "|---|---|---:|---:|---:|"]
    for m in s["methods"].split(","):
        rows.append(f"| {m} (top-k {s['top_k']}) | {s['model_name']} ({s.get('dtype', '?')}) | "
                    f"{v(rec, f'{m}.right')}/{v(rec, f'{m}.questions')} | {v(rec, f'{m}.in_prompt')}/{v(rec, f'{m}.questions')} "
                    f"| {v(rec, f'{m}.s_per_question'):.1f} |")
    return "\n".join(rows + ["", f"{s['files']} generated files, {s['questions']} questions (seed {s['seed']}), all "
                             "measured. " + provenance(rec)])


def block_gate_training(rec: dict) -> str:
    s = rec["settings"]
    budgets = s["run_budgets"].split(",")
    trained = {n: rec["details"].get(f"{n}_gates") for n in ("seer", "dsa")}
    lines = [f"In-model decode attention-mass recall ({s['context_tokens']}-token held-out essay tail, "
             f"{s.get('model_name', s['model'])}, {s['new_tokens']} greedy tokens; measured):", "",
             "| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for label, name in (("quest", "quest"), ("seer (identity gates)", "seer"), (f"seer ({trained['seer']} gates)", "seer+trained"),
                        ("dsa (model's q/k)", "dsa"), (f"dsa ({trained['dsa']} indexer)", "dsa+trained"), ("oracle", "oracle")):
        lines.append(f"| {label} | " + " | ".join(fmt(v(rec, f"in_model.{name}@{b}"), 4) for b in budgets) + " |")
    lines += ["", f"Held-out offline recall ({s['seq_len']}-token chunks):", "",
              "| estimator | budget | untrained | trained | KL untrained -> trained |", "|---|---:|---:|---:|---|"]
    for n in ("seer", "dsa"):
        for b in s["budgets"].split(","):
            k = f"offline.{n}@{b}"
            lines.append(f"| {n} | {b} | {fmt(v(rec, k + '.untrained'), 4)} | {fmt(v(rec, k + '.trained'), 4)} "
                         f"| {fmt(v(rec, k + '.kl_untrained'), 3)} -> {fmt(v(rec, k + '.kl_trained'), 3)} |")
    tr = [f"{n} {v(rec, f'train_s.{n}'):.0f} s" for n in ("seer", "dsa") if v(rec, f"train_s.{n}") is not None]
    if tr:
        lines += ["", f"Training ({s['steps']} steps x {s['seq_len']} tokens, measured): " + ", ".join(tr) + "."]
    return "\n".join(lines + ["", provenance(rec)])


def block_model_accuracy(rec: dict) -> str:
    steps = [k[len("mape."):] for k in rec["figures"] if k.startswith("mape.")]
    s = rec["settings"]
    rows = ["| evaluated | step calls | MAPE, all | " + " | ".join(steps) + " |", "|---|---:|---:|" + "---:|" * len(steps)]
    for prefix, label, lengths in (("mape", "inside the fitted range", s["lengths"]),
                                   ("mape_outside", "outside (above) it", s.get("outside_lengths"))):
        if v(rec, prefix) is None:
            continue
        n = sum(1 for c in rec["details"]["calls"] if c.get("range", "inside") == ("inside" if prefix == "mape" else "outside"))
        rows.append(f"| {label}: {lengths} | {n} | **{v(rec, prefix):.1f}%** | "
                    + " | ".join(f"{v(rec, prefix + '.' + x):.1f}%" for x in steps) + " |")
    return "\n".join(rows + [
        "", f"Predicted step times are **modelled** (device model `{s['device_model']}`, op classes fitted {s['fit']} "
        f"at lengths {s.get('fit_lengths', 'up to 40960')}); the times they are compared with are **measured** on this host, "
        f"with the same kernels the fit timed, budgets {s['budgets']}. Inside the fitted range this checks the fit; "
        "outside it, whether the model extrapolates. " + provenance(rec)])


def block_methods(rec: dict) -> str:
    s = rec["settings"]
    rows = ["| method | answer | right | KV bytes | decode ms/token |", "|---|---|---|---:|---:|"]
    for r in rec["details"]["runs"]:
        k = r["label"]
        kv = v(rec, f"{k}.kv_bytes")
        untrained = k in ("seer", "dsa") and not s.get(f"{k}_gates")
        rows.append(f"| {k}{' (untrained estimator)' if untrained else ''} | {cell(repr(r['answer']))} | {'yes' if r['correct'] else 'no'} "
                    f"| {'–' if kv is None else f'{kv / 1e6:.1f} MB'} | {fmt(v(rec, f'{k}.decode_ms_per_token'), 1)} |")
    return "\n".join([f"Passkey {rec['details']['passkey']} in a {v(rec, 'prompt_tokens')}-token prompt, "
                      f"{s.get('model_name', s['model'])}, budget {s['budget']}, {s['max_new_tokens']} new tokens "
                      "(all measured):", "", *rows, "", provenance(rec)])


def block_contextual(rec: dict, records: "Records") -> str:
    s, r = rec["settings"], rec["details"]["run"]
    rows = ["| step | ms | calls |", "|---|---:|---:|"]
    rows += [f"| {st} | {fmt(v(rec, st + '.ms'), 1)} | {v(rec, st + '.calls')} |" for st in ("prepare", "relevancy", "retrieval", "apply")]
    mem = "; ".join(f"chunk {h['chunk']}: {h['memory_tokens']} tok" for h in r["memory_after_chunk"])
    return "\n".join([
        f"Passkey {s['passkey']} in {v(rec, 'context_tokens')} context tokens, memory bound {s['memory_tokens']} tokens "
        f"({v(rec, 'context_over_memory')}x), {r['model']}: answer {cell(repr(r['answer']))}, "
        f"{'correct' if v(rec, 'correct') else 'WRONG'}; passkey in the final memory: {bool(v(rec, 'passkey_in_final_memory'))}.",
        f"{v(rec, 'chunks')} chunks, {v(rec, 'llm_calls')} LLM calls, {fmt(v(rec, 'tokens_read'))} tokens read "
        f"({fmt(v(rec, 'tokens_prefilled'))} prefilled: the prompt prefix's KV is reused), {fmt(v(rec, 'tokens_written'))} "
        f"written; memory after each chunk: {mem} (all measured).", "", *rows, "", provenance(rec), "",
        "Every recorded run (newest last; the current prompts are those of commit `f695c551b1` on):", "",
        *[f"- seed {r['settings']['seed']}, passkey at depth {r['settings'].get('depth')}, commit `{r['git']['commit'][:10]}`: "
          f"answer {cell(repr(r['details']['run']['answer']))}, {'correct' if v(r, 'correct') else 'wrong'}; "
          f"passkey in the final memory: {bool(v(r, 'passkey_in_final_memory'))}"
          for r in records.all("record_contextual")]])


block_contextual.wants_records = True




def block_hmt(rec: dict) -> str:
    s = rec["settings"]
    k = s.get("sensory_tokens")
    return "\n".join([
        f"Held-out essay perplexity, {s.get('model_name', s['model'])}, segments of {s['segment_tokens']} tokens, "
        f"{s['held_out_chunks']} chunks of {s['seq_len']} tokens never trained on; HMT trained {s['steps']} steps "
        f"at lr {s['lr']} ({fmt(v(rec, 'train_ms') / 1e3, 0)} s, measured)"
        + (f"; sensory memory: the previous segment's last {k} tokens" if k else "") + ":", "",
        "| segment alone (floor) | sensory memory only (ablation) | HMT untrained | HMT trained | full context (ceiling) "
        "| gap closed | of it by the memory embeddings |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {fmt(v(rec, 'ppl.segment_alone'), 3)} | {fmt(v(rec, 'ppl.sensory_only'), 3)} | {fmt(v(rec, 'ppl.hmt_untrained'), 3)} "
        f"| {fmt(v(rec, 'ppl.hmt_trained'), 3)} | {fmt(v(rec, 'ppl.full_context'), 3)} | {fmt(v(rec, 'gap_closed'), 1, pct=True)} "
        f"| {fmt(v(rec, 'embeddings_gap_closed'), 1, pct=True)} |", "",
        "gap closed = (floor - HMT trained) / (floor - ceiling); of it by the memory embeddings = (sensory only - HMT "
        "trained) / (floor - ceiling).", "", provenance(rec)])


def block_contextual_steps(rec: dict) -> str:
    """record_contextual_profile: per method x step, measured ms and calls, analytic GFLOP and flop/byte; the
    overhead; the modelled best placement."""
    s, d = rec["settings"], rec["details"]
    lines = [f"`hetmem {' '.join(s['hetmem_profile_argv'])}`, then `{d['plan_command']}` "
             "(times **measured**, whole runs over the context; flops and bytes **analytic**; placements **modelled**):",
             "", "| method | context | step | ms | calls | GFLOP | flop/byte |", "|---|---:|---|---:|---:|---:|---:|"]
    notes = []
    for key in d["runs"]:
        m, L = key.split("@")
        for st in ("prepare", "relevancy", "retrieval", "apply", "total"):
            ms = v(rec, f"{key}.{st}.ms")
            if ms is None:
                continue
            calls = "" if st == "total" else v(rec, f"{key}.{st}.calls")
            lines.append(f"| {m} | {int(L):,} | {st} | {fmt(ms, 1)} | {calls} | {fmt(v(rec, f'{key}.{st}.gflop'), 3)} "
                         f"| {fmt(v(rec, f'{key}.{st}.intensity'), 2)} |")
        best = d.get(f"plan.{key}.best")
        notes.append(f"- `{m}` @ {int(L):,}: memory-processing overhead {fmt(v(rec, f'{key}.overhead'), 1, True)} "
                     f"({rec['figures'][f'{key}.overhead'].get('note', '').split(': ', 1)[-1]}); with Apply "
                     f"{fmt(v(rec, f'{key}.overhead_incl_apply'), 1, True)}"
                     + (f"; best placement on {s['system']} (modelled): {best}, "
                        f"{fmt(v(rec, f'plan.{key}.speedup'), 2)}x the all-GPU plan" if best else "")
                     + (f". {d[f'notes.{key}']}" if d.get(f"notes.{key}") else ""))
    for k, reason in sorted(d.items()):
        if k.startswith("skipped."):
            notes.append(f"- `{k[8:]}`: skipped ({reason})")
    return "\n".join(lines + [""] + notes + ["", provenance(rec)])


def block_limits(rec: dict, records: "Records") -> str:
    """bench_limits: the latest runs labelled ``before``, ``after`` and ``after2`` side by side (or the latest)."""
    runs = [records.latest("bench_limits", lambda r, lb=lb: r["settings"].get("label") == lb)
            for lb in ("before", "after", "after2", "after2-rss", "after2-p3", "after3")]
    runs = [r for r in runs if r is not None] or [rec]
    rows = [("read bandwidth (GB/s, 2 GiB sum)", "read_bandwidth", "limit"),
            ("read bandwidth beside the samples (GB/s, median of 1 GiB sums)", "read_bandwidth_beside_samples",
             "limit"),
            ("copy bandwidth (GB/s, read+write)", "copy_bandwidth", "limit"),
            ("fp32 matmul (GFLOP/s)", "fp32_matmul", "limit")]

    def lengths(part):  # every length any shown run measured
        return sorted({L for r in runs for L in r["details"]["result"].get(part, {}).get("lengths", [])})

    for L in lengths("p1"):
        rows.append((f"P1 relevancy+top-k at {L // 1024}k, fraction of read bandwidth", f"p1_{L}", ">= 0.8"))
    for L in lengths("p2"):
        rows.append((f"P2 sparse step at {L // 1024}k, x byte-limit time", f"p2_{L}", "<= 1.3"))
        rows.append((f"P2 speedup over dense SDPA at {L // 1024}k", f"p2_speedup_{L}", ""))
    rows += [("P3 dense, x bandwidth-limit ms/token", "p3_dense", "<= 1.6"),
             ("P3 quest 1/8 budget, x bandwidth-limit ms/token", "p3_quest", "<= 1.6"),
             ("P3 dense ms/token", "p3_dense_ms_per_token", ""), ("P3 quest ms/token", "p3_quest_ms_per_token", ""),
             ("P3 quest / dense decode speed (median of 5)", "quest_over_dense", ">= 1.5")]
    for kvd in ("bf16", "fp16"):
        if any(v(r, f"p3_dense_kv_{kvd}") is not None for r in runs):
            rows += [(f"P3 dense, KV {kvd}, x bandwidth-limit ms/token", f"p3_dense_kv_{kvd}", "<= 1.6"),
                     (f"P3 quest, KV {kvd}, x bandwidth-limit ms/token", f"p3_quest_kv_{kvd}", "<= 1.6"),
                     (f"P3 dense ms/token, KV {kvd}", f"p3_dense_kv_{kvd}_ms_per_token", ""),
                     (f"P3 quest ms/token, KV {kvd}", f"p3_quest_kv_{kvd}_ms_per_token", ""),
                     (f"P3 quest / dense decode speed, KV {kvd}", f"quest_over_dense_kv_{kvd}", ">= 1.5")]
    for wd in ("bf16", "fp16"):
        if any(v(r, f"p3_dense_weights_{wd}") is not None for r in runs):
            rows += [(f"P3 dense, weights+KV {wd}, x bandwidth-limit ms/token", f"p3_dense_weights_{wd}", "<= 1.6"),
                     (f"P3 quest, weights+KV {wd}, x bandwidth-limit ms/token", f"p3_quest_weights_{wd}", "<= 1.6"),
                     (f"P3 dense ms/token, weights+KV {wd}", f"p3_dense_weights_{wd}_ms_per_token", ""),
                     (f"P3 quest ms/token, weights+KV {wd}", f"p3_quest_weights_{wd}_ms_per_token", ""),
                     (f"P3 quest / dense decode speed, weights+KV {wd}", f"quest_over_dense_weights_{wd}", ">= 1.5"),
                     (f"P3 quest / dense at the bandwidth limit, weights+KV {wd} (modelled: bytes ratio)",
                      f"quest_over_dense_weights_{wd}_at_limit", "")]
    rows += [("prefill peak RSS - RSS after load, x KV bytes (Qwen 16k)", "prefill_rss_ratio", "<= 1.3")]
    head = "| figure (measured) | target | " + " | ".join(r["settings"].get("label") or "latest" for r in runs) + " |"
    out = [head, "|---|---|" + "---|" * len(runs)]
    for label, name, target in rows:
        if all(v(r, name) is None for r in runs):
            continue
        out.append(f"| {label} | {target} | " + " | ".join(fmt(v(r, name)) for r in runs) + " |")
    out.append("")
    for r in runs:
        q = r["details"]["result"].get("quest_over_dense")
        spread = (f" quest/dense min {q['min']}, median {q['median']}, max {q['max']} (at the limit "
                  f"{q.get('at_limit')});" if q else "")
        if r["details"]["result"].get("limit_beside_samples"):
            spread += " P1/P2/P3 ratios to the read bandwidth measured beside each sample (median of per-sample ratios);"
        out.append(f"- **{r['settings'].get('label') or 'latest'}**: kernels {r['details'].get('kernels')};{spread} "
                   + provenance(r))
    return "\n".join(out)


block_limits.wants_records = True


def block_decode_flame(rec: dict, records: "Records") -> str:
    """py-spy flame summaries of a quest decode, before and after (benchmarks/profiles)."""
    out = []
    for w in ("before", "after", "after2", "after3"):
        p = records.root / "benchmarks" / "profiles" / f"quest_decode_{w}.txt"
        if p.exists():
            out += [f"**{w}** (`benchmarks/profiles/{p.name}`):", "", "```", p.read_text().rstrip(), "```", ""]
    return "\n".join(out) or "*No profile summaries recorded.*"


block_decode_flame.wants_records = True
def block_flex(rec: dict) -> str:
    """bench_flex: ms per sparse decode step of one layer for each implementation, per length."""
    names = [("cpp", "C++ page attention (in place)"), ("flex", "flex_attention, block mask made per step"),
             ("flex_fixed_mask", "flex_attention, block mask made once"), ("inductor", "inductor gather-attend")]
    rows = rec["details"]["rows"]
    out = ["| implementation | " + " | ".join(f"{r['length'] // 1024}k ms/step" for r in rows) + " |",
           "|---|" + "---:|" * len(rows)]
    for key, label in names:
        cells = []
        for r in rows:
            x = r.get(key, {})
            cells.append(fmt(x["ms"], 3) if "ms" in x else ("failed" if "error" in x else "–"))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("| create_block_mask alone | " + " | ".join(fmt(r.get("block_mask_ms"), 3) for r in rows) + " |")
    out += ["", "Fastest (block mask made per step, as decode needs): "
            + ", ".join(f"{r['length'] // 1024}k: {r['fastest']}" for r in rows)
            + f". Kernels: {rec['details'].get('kernels')}.", "", provenance(rec)]
    return "\n".join(out)


def block_compile(rec: dict) -> str:
    """bench_compile: eager vs torch.compile'd decode, and the one-pass DSA/seer relevancy vs torch."""
    res = rec["details"]["result"]
    out = []
    c = res.get("compile")
    if c:
        out += [f"SmolLM2, {c['tokens']}-token prompt, decode ms/token (median of {c['rounds']} alternating rounds):", "",
                "| method | eager | MLP + RMSNorms compiled | compiled / eager (median per round) |",
                "|---|---:|---:|---:|"]
        for n in ("dense", "quest"):
            x = c[n]
            out.append(f"| {n} | {fmt(x['eager_ms_per_token'])} | {fmt(x['compiled_ms_per_token'])} | "
                       f"{fmt(x['compiled_over_eager'])} |")
        out += ["", f"First compile (both methods' decode shapes): {fmt(c['compile_s'], 1)} s.", ""]
    ix = res.get("indexers")
    if ix:
        L = rec["settings"]["index_tokens"] // 1024
        out += [f"Relevancy + top-k at {L}k tokens (DSA: 4 index heads x 128, top 2048 tokens; seer: 8 KV heads, "
                f"blocks of 16, gate dim 128, top 128 blocks):", "",
                "| op | ms | GB/s | fraction of the read bandwidth beside each sample |", "|---|---:|---:|---:|"]
        labels = {"dsa_torch": "DSA indexer, torch (GEMM, ReLU, weighted sum)",
                  "dsa_compiled": "DSA indexer, compiled one pass (`index_scores`)",
                  "seer_torch": "seer block scores, torch (batched GEMV)",
                  "seer_compiled": "seer block scores, compiled (`block_scores`)"}
        for k, label in labels.items():
            if k in ix:
                out.append(f"| {label} | {fmt(ix[k]['ms'], 3)} | {fmt(ix[k]['GBps'])} | {fmt(ix[k]['ratio'])} |")
        out.append("")
    out.append(f"Kernels: {rec['details'].get('kernels')}.")
    return "\n".join(out + ["", provenance(rec)])


def _link_lines(rec: dict) -> list[str]:
    if v(rec, "link.latency_us") is not None:  # records before the per-node-count calibration
        return [f"Link calibrated through the compiled graph: {fmt(v(rec, 'link.latency_us'), 0)} us + bytes / "
                f"{fmt(v(rec, 'link.bandwidth_gbs'))} GB/s; its MAPE against every measured decode transfer: "
                f"{fmt(v(rec, 'link_model_mape'), 1)}% (modelled vs measured)."]
    fits = "; ".join(f"{n} node(s): {fmt(v(rec, f'link.{n}node.latency_us'), 0)} us per call + "
                     f"{fmt(v(rec, f'link.{n}node.per_array_us'), 1)} us per array + bytes / "
                     f"{fmt(v(rec, f'link.{n}node.bandwidth_gbs'))} GB/s"
                     + (f" + {fmt(v(rec, f'link.{n}node.compute_share'))} x the slowest node's compute"
                        if v(rec, f"link.{n}node.compute_share") is not None else "")
                     + (f" (an empty compiled-graph call under the same conditions: "
                        f"{fmt(v(rec, f'link.{n}node.compiled_graph_call_us'), 0)} us)"
                        if v(rec, f"link.{n}node.compiled_graph_call_us") is not None else "")
                     for n in (1, 2) if v(rec, f"link.{n}node.latency_us") is not None)
    via = "the socket channel" if v(rec, "call_us.socket") is not None else "the compiled graph"
    return [f"Link calibrated through {via} per node count (`runtime.nodes.linkcal`, as `hetmem plan "
            f"--system host+memnode` calibrates it): {fits}. The link model's MAPE against the measured link time "
            f"(round trip minus the slowest node's compute) of every decode (layer, step): "
            f"**{fmt(v(rec, 'link_model_mape'), 1)}%** over {fmt(v(rec, 'link_model_entries'))} entries (modelled vs measured"
            + (f"; the link calibrated again right before and right after each run and fitted on both, as the shared "
               f"machine's load drifts: against the calibration right before alone it is "
               f"{fmt(v(rec, 'link_model_mape_before_calibration'), 1)}%, against the one at the start of the benchmark "
               f"{fmt(v(rec, 'link_model_mape_start_calibration'), 1)}%"
               if v(rec, "link_model_mape_before_calibration") is not None else
               f"; the link calibrated again right before each run, as the shared machine's load drifts: against the one "
               f"calibration at the start of the benchmark it is {fmt(v(rec, 'link_model_mape_start_calibration'), 1)}%"
               if v(rec, "link_model_mape_start_calibration") is not None else "") + ")."]


def _call_lines(rec: dict) -> str:
    if v(rec, "call_us.socket") is None:  # records before the socket channel
        return (f"Per call to 2 nodes (median, empty batch): plain actor call {fmt(v(rec, 'call_us.plain_actor'), 0)} "
                f"us, compiled graph {fmt(v(rec, 'call_us.compiled_graph'), 0)} us "
                f"(**{fmt(v(rec, 'call_overhead_ratio'))}x**).")
    names = (("plain actor call", "plain_actor", "plain"), ("Ray Compiled Graph", "compiled_graph", "compiled"),
             ("direct socket channel (the default)", "socket", "socket"))
    per = ", ".join(f"{label} {fmt(v(rec, f'call_us.{k}.1node'), 0)} / {fmt(v(rec, f'call_us.{k}'), 0)} us"
                    for label, k, _ in names)
    dec = ", ".join(f"{label.split(' (')[0]} {fmt(v(rec, f'call_us.{k}.decode_request'), 0)} us" for label, k, _ in names)
    idle = ", ".join(f"{t} {fmt(v(rec, f'idle_node_cpu.{t}'))}" for _, _, t in names)
    return (f"Per call to 1 / 2 nodes (median, empty batch): {per} (socket **{fmt(v(rec, 'call_overhead_ratio.socket'))}x** "
            f"faster than a plain actor call, compiled graph {fmt(v(rec, 'call_overhead_ratio'))}x). A decode-shaped "
            f"request to 2 nodes (query, new K/V and plain fields, echoed): {dec}. CPU an idle node process uses "
            f"(cores): {idle} (a compiled graph's actors poll their channels).")


def _split_lines(rec: dict) -> list[str]:
    if v(rec, "recall.attention_split.2node") is None:
        return []
    return ["", f"Split budget (`--split-budget`, attention layout, 2 nodes, one round per layer: "
                f"{fmt(v(rec, 'calls_per_layer_step.attention_split.2node'))} calls per layer per step): "
                f"{fmt(v(rec, 'decode_ms_per_token.attention_split.2node'), 1)} ms/token "
                f"({fmt(v(rec, 'decode_ratio.attention_split.2node'))}x in-process), "
                f"{fmt(v(rec, 'bytes_per_layer_step.attention_split.2node'))} B per layer per step; attention-mass "
                f"recall **{fmt(v(rec, 'recall.attention_split.2node'), 4)}** against the exact mode's "
                f"**{fmt(v(rec, 'recall.exact.2node'), 4)}** at the same steps (measured, `llm/recall.py`)."]


def block_disaggregated(rec: dict) -> str:
    s = rec["settings"]
    rows = ["| layout | nodes | decode ms/token | vs in-process | bytes per layer per step: measured / modelled "
            "| tokens identical |", "|---|---:|---:|---:|---:|---|",
            f"| in-process | – | {fmt(v(rec, 'decode_ms_per_token.in_process'), 1)} | 1.00x | – | – |"]
    names = {"attention": "attention, one round" if v(rec, "decode_ms_per_token.attention_2round.1node") is not None
             else "attention", "attention_2round": "attention, two rounds"}
    for layout in ("index", "kv", "attention", "attention_2round"):
        for n in (1, 2):
            k = f"{layout}.{n}node"
            if v(rec, f"decode_ms_per_token.{k}") is None:
                continue
            rows.append(f"| {names.get(layout, layout)} | {n} | {fmt(v(rec, f'decode_ms_per_token.{k}'), 1)} "
                        f"| {fmt(v(rec, f'decode_ratio.{k}'))}x | {fmt(v(rec, f'bytes_per_layer_step.{k}'))} / "
                        f"{fmt(v(rec, f'bytes_per_layer_step_model.{k}'))} | {v(rec, f'tokens_identical.{k}')} |")
    return "\n".join([
        _call_lines(rec) + " " + " ".join(_link_lines(rec)), "",
        f"SmolLM2, quest at budget {s['budget']}, {s.get('prompt_tokens', s['tokens']):,}-token prompt, {s['new']} new "
        f"tokens; in-process with {s.get('in_process_threads', '?')} torch threads; with nodes the head and each node "
        "get the threads of `memory_nodes.threads` in the run record. All measured except the modelled column.", "",
        *rows, "", "In-process per torch thread count: " + ", ".join(
            f"{k.rsplit('_', 1)[-1].replace('thread', '')} thread(s) {fmt(f['value'], 1)} ms/token"
            for k, f in sorted(rec["figures"].items()) if k.startswith("decode_ms_per_token.in_process_"))
        + " (the shared machine's other load makes more threads slower).", *_split_lines(rec), "", provenance(rec)])


def block_serve(rec: dict, records: "Records") -> str:
    """The latest in-process run (the batch engine's throughput), then the latest run with memory nodes (the
    SIGKILL fault), when it is a different record."""
    local = records.latest("bench_serve", lambda r: not r["settings"].get("memory_nodes")) or rec
    nodes = records.latest("bench_serve", lambda r: bool(r["settings"].get("memory_nodes")))
    parts = [_serve_run(local)]
    if nodes is not None and nodes is not local:
        parts += ["", "With memory nodes:", "", _serve_run(nodes)]
    return "\n".join(parts)


block_serve.wants_records = True


def _serve_run(rec: dict) -> str:
    s = rec["settings"]
    rows = ["| run | clients | tokens/s | p50 / p99 latency ms | p50 / p99 time to first token ms | errors |",
            "|---|---:|---:|---:|---:|---:|"]
    for key, clients in (("sequential", 1), ("concurrent", s["concurrency"]), ("fault", s["concurrency"])):
        if v(rec, f"{key}.tokens_per_s") is None:
            continue
        label = "concurrent, memory node 0 SIGKILLed at half" if key == "fault" else key
        rows.append(f"| {label} | {clients} | {fmt(v(rec, f'{key}.tokens_per_s'), 1)} "
                    f"| {fmt(v(rec, f'{key}.p50_latency_ms'), 0)} / {fmt(v(rec, f'{key}.p99_latency_ms'), 0)} "
                    f"| {fmt(v(rec, f'{key}.ttft_p50_ms'), 0)} / {fmt(v(rec, f'{key}.ttft_p99_ms'), 0)} "
                    f"| {v(rec, f'{key}.errors')} |")
    same = {1: "yes", 0: "no", None: "–"}
    fault = (f" With the fault: outputs identical to the run without it: {same[v(rec, 'fault.outputs_identical')]}."
             if v(rec, "fault.tokens_per_s") is not None else "")
    method = s.get("hetmem", {}).get("method", "dense")
    return "\n".join([
        f"SmolLM2 through `hetmem serve` (engine: `{s.get('engine')}`), {s['requests']} short chat requests per run, "
        f"{s['max_tokens']} new tokens each, {method}"
        f"{', ' + str(s['memory_nodes']) + ' memory node(s)' if s.get('memory_nodes') else ''}, streaming `openai` "
        f"clients; server with {s.get('server_threads')} torch thread(s). All measured.", "", *rows, "",
        f"Throughput ratio, {s['concurrency']} concurrent clients / 1: **{fmt(v(rec, 'throughput_ratio'))}x**; "
        f"concurrent outputs identical to the sequential ones: {same[v(rec, 'concurrent.outputs_identical')]}.{fault}",
        "", provenance(rec)])


def block_kvquant_passkey(rec: dict, records: "Records") -> str:
    """bench_kvquant_passkey: per context length and method, the latest record that ran it (runs of one length
    or one bit width are recorded apart: a long context takes long)."""
    latest: dict[tuple[int, str], dict] = {}
    for r in records.all("bench_kvquant_passkey"):
        for name in r["figures"]:
            n, label, fig = name.split(".", 2)
            if fig == "correct":
                latest[(int(n), label)] = r
    order = {"dense": 0, "kvquant-8": 1, "kvquant-4": 2, "kvquant-2": 3}
    rows = ["| filler tokens | method | passkey correct | KV MB | attention peak extra MB | prefill copy MB "
            "| decode ms/token | attention ms/step | run |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    used: list[dict] = []
    for (n, label), r in sorted(latest.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][1])):
        if r not in used:
            used.append(r)
        f = lambda x, r=r, n=n, label=label: v(r, f"{n}.{label}.{x}")  # noqa: E731
        copy = f("prefill_copy_bytes")
        rows.append(f"| {n:,} | {label} | {f('correct')}/{f('of')} | {fmt(f('kv_bytes') / 1e6, 1)} "
                    f"| {fmt(f('attn_peak_extra_bytes') / 1e6, 2)} | {fmt(copy / 1e6, 1) if copy else '–'} "
                    f"| {fmt(f('decode_ms_per_token'), 0)} | {fmt(f('attn_ms_per_step'), 1)} | {used.index(r) + 1} |")
    notes = []
    for i, r in enumerate(used, 1):
        s = r["settings"]
        notes.append(f"- run {i}: {s['model']}, kvquant group {s['group_size']}, residual {s['residual']}"
                     f"{', h2o budget ' + str(s['h2o']) if s.get('h2o') else ''}; prefill chunks of "
                     f"{s['prefill_chunk'] or 'the whole prompt'}, at most {s['max_new_tokens']} new tokens. "
                     + provenance(r))
    return "\n".join(["All measured. KV MB: bytes allocated for K/V at the end of the run. Attention peak extra MB: "
                      "after the run, the bytes one layer's decode Apply allocates on the final cache (allocator "
                      "events, max over layers). Prefill copy MB (kvquant): the transient float copy of one layer's "
                      "context a prefill chunk's attention gets. Decode ms/token: the decode loop over its model "
                      "forwards; attention ms/step: every layer's decode Apply timed alone (best of 3), summed.", "",
                      *rows, "", *notes])


block_kvquant_passkey.wants_records = True


BLOCKS = {
    "kvquant-passkey": ("bench_kvquant_passkey", block_kvquant_passkey),
    "contextual": ("record_contextual", block_contextual),
    "hmt-perplexity": ("bench_hmt_perplexity", block_hmt),
    "contextual-steps": ("record_contextual_profile", block_contextual_steps),
    "limits": ("bench_limits", block_limits),
    "decode-flame": ("bench_limits", block_decode_flame),
    "compile": ("bench_compile", block_compile),
    "flex": ("bench_flex", block_flex),
    "demo": ("record_demo", block_demo),
    "profile": ("record_profile", block_profile),
    "plan": ("record_profile", block_plan),
    "profiler-overhead": ("bench_profiler_overhead", block_profiler_overhead),
    "bm25": ("bench_bm25", block_bm25),
    "dense-search": ("bench_dense_search", block_dense_search),
    "rag-qa": ("eval_rag_qa", block_rag_qa),
    "gate-training": ("bench_gate_training", block_gate_training),
    "model-accuracy": ("model_accuracy", block_model_accuracy),
    "methods": ("record_methods", block_methods),
    "disaggregated": ("bench_disaggregated", block_disaggregated),
    "serve": ("bench_serve", block_serve),
}


def _md_sections(text: str) -> dict[str, list[str]]:
    """A Markdown file's lines by ``## `` section (the part before the first one under ``""``)."""
    out, cur = {"": []}, ""
    for line in text.splitlines():
        if line.startswith("## "):
            cur = line[3:].strip()
            out[cur] = []
        else:
            out[cur].append(line)
    return out


def render_eval_block(run_dir: str, root: Path) -> str:
    """The tables of ``docs/eval/<run_dir>/summary.md`` (written by ``hetmem eval`` from its results.jsonl):
    the runs that produced it, accuracy per task, per method, and whether recall ranks the arms as accuracy."""
    path = Path(root) / "docs" / "eval" / run_dir / "summary.md"
    head = f"<!-- generated by benchmarks/make_results.py from docs/eval/{run_dir}/summary.md: do not edit by hand -->"
    if not path.is_file():
        return f"{head}\n*No eval run in `docs/eval/{run_dir}/` yet: run `hetmem eval ... --out docs/eval/{run_dir}`.*\n"
    sec = _md_sections(path.read_text(encoding="utf-8"))
    tables, cur = [], []  # the runs table, then the per-task table
    for ln in sec[""] + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            tables, cur = tables + [cur], []
    runs, per_task = (tables + [[], []])[:2]
    model = [ln for ln in sec[""] if ln.startswith("Model:")]
    body = [*model, "", *runs, "", *per_task, "", "Each method over every task and length:", "",
            *[ln for ln in sec.get("Each method over every task and length", []) if ln.startswith("|")]]
    rank = sec.get("Does attention-mass recall rank the methods as accuracy does?", [])
    body += ["", *[ln for ln in rank if "Kendall" in ln or ln.startswith("No pair") or ln.startswith("Pairs where")]]
    body += ["", *[ln for ln in sec.get("One prefill per context", []) if ln.strip()]]
    body = "\n".join(line.rstrip() for line in body).strip("\n")
    return f"{head}\n{body}\n"


def known_block(name: str, root: Path = ROOT) -> bool:
    """A block name this script renders: one of BLOCKS, or ``eval-<dir>`` for a run committed in docs/eval/<dir>/."""
    if name.startswith("eval-"):
        return (Path(root) / "docs" / "eval" / name[len("eval-"):] / "summary.md").is_file()
    return name in BLOCKS


def render_block(name: str, records: Records) -> str:
    if name.startswith("eval-"):  # an eval run committed under docs/eval/<dir>/
        return render_eval_block(name[len("eval-"):], records.root)
    if name not in BLOCKS:
        raise ValueError(f"unknown results block '{name}' (known: {', '.join(sorted(BLOCKS))})")
    bench, fn = BLOCKS[name]
    rec = records.latest(bench)
    if rec is None:
        body = missing(bench)
    else:
        body = fn(rec, records) if getattr(fn, "wants_records", False) else fn(rec)
    body = "\n".join(line.rstrip() for line in body.splitlines())  # editors strip trailing blanks
    return f"{_header(bench)}\n{body}\n"


def render_markers(text: str, records: Records, where: str = "") -> str:
    """``text`` with every results block regenerated; unbalanced or unknown markers are an error."""
    marks = BEGIN.findall(text)
    opened = [n for n, kind in marks if kind == "begin"]
    closed = [n for n, kind in marks if kind == "end"]
    if opened != closed:
        raise ValueError(f"{where}: unbalanced results markers (begin: {opened}, end: {closed})")
    return MARK.sub(lambda m: f"<!-- results:{m.group(1)}:begin -->\n{render_block(m.group(1), records)}"
                              f"<!-- results:{m.group(1)}:end -->", text)


# --------------------------------------------------------------------------------------------------
# RESULTS.md


def render_results_md(records: Records) -> str:
    known = [b for b, _, _ in BENCHES]
    order = known + [b for b in records.benches() if b not in known]
    what = {b: w for b, w, _ in BENCHES}
    out = ["# Benchmark results", "",
           "<!-- generated by benchmarks/make_results.py from benchmarks/results/*.jsonl: do not edit by hand -->",
           "Generated by `python benchmarks/make_results.py` from the records the benchmarks append to",
           "`benchmarks/results/<bench>.jsonl` (benchmarks/_record.py); each section shows the latest record. Every",
           "figure says whether it is **measured** (ran on the machine named) or **modelled** (a device model",
           "produced it). The machines are shared: the load average at start and end says how busy it was.", ""]
    for b in order:
        recs = records.all(b)
        out += [f"## `{b}`", ""]
        if b in what:
            out += [what[b] + ".", ""]
        if not recs:
            out += [missing(b), ""]
            continue
        rec = recs[-1]
        out += [provenance(rec) + (f" Exit status: {'ok' if rec['ok'] else 'FAILED its target'}."
                                   if rec.get("ok") is not None else ""), ""]
        if len(recs) > 1:
            out += [f"({len(recs) - 1} earlier record{'s' if len(recs) > 2 else ''} in `{RESULTS}/{b}.jsonl`.)", ""]
        out += ["| figure | value | unit | source | note |", "|---|---:|---|---|---|"]
        for name, f in rec["figures"].items():
            val = f["value"]
            val = "–" if val is None else (f"{val:,}" if isinstance(val, int) else f"{val:.6g}")
            out.append(f"| `{name}` | {val} | {f['unit']} | {f['source']} | {cell(f.get('note', ''))} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------------


def targets(root: Path = ROOT) -> list[Path]:
    """The documents this script owns: RESULTS.md whole, README.md and docs/*.md between markers."""
    root = Path(root)
    return [root / "benchmarks" / "RESULTS.md", root / "README.md", *sorted((root / "docs").glob("*.md"))]


def generate(root: Path = ROOT) -> dict[Path, str]:
    """Path -> the text it should have, for every document this script owns."""
    records = Records(root)
    out = {}
    for p in targets(root):
        if p.name == "RESULTS.md":
            out[p] = render_results_md(records)
        elif p.exists():
            out[p] = render_markers(p.read_text(encoding="utf-8"), records, str(p.relative_to(root)))
    return out


def stale(root: Path = ROOT) -> list[Path]:
    return [p for p, text in generate(root).items() if not p.exists() or p.read_text(encoding="utf-8") != text]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document is out of date")
    a = ap.parse_args(argv)
    gen = generate(ROOT)
    changed = [p for p, text in gen.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    if a.check:
        for p in changed:
            print(f"out of date: {p.relative_to(ROOT)} (run python benchmarks/make_results.py)", file=sys.stderr)
        return 1 if changed else 0
    for p in changed:
        p.write_text(gen[p], encoding="utf-8")
        print(f"rewrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
