"""``hetmem serve`` under load: 1 client sequentially vs C concurrent clients, and the same load while a memory
node is SIGKILLed mid-way. All figures measured, in one run, with SmolLM2 through real HTTP (the ``openai``
client, streaming, so that time to first token is seen as a client sees it).

1. sequential: one client sends the N short requests one after another;
2. concurrent: C clients (threads, one ``openai`` client each) send the same N requests;
   tokens/s of each (completion tokens / wall time), their ratio, p50/p99 latency, p50/p99 time to first token,
   errors; whether every greedy output equals the sequential run's;
3. with ``--memory-nodes K``: the concurrent load again while memory node 0 is SIGKILLed once half of the requests
   are answered (its pid from a response's ``hetmem.memory_nodes.pids``): failed requests (target 0) and whether
   every output equals the run without the fault. With memory nodes the requests use quest (the nodes hold
   sparse-attention memory); without, dense.

    python benchmarks/bench_serve.py [--requests 200] [--concurrency 16] [--max-tokens 16] [--memory-nodes K]

The engine behind the server is whatever ``runtime.serve_engine.make_engine`` returns (recorded as ``engine``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import openai  # noqa: E402
import torch  # noqa: E402

from _record import Record  # noqa: E402
from hetmem.serve.deploy import ServeConfig, start  # noqa: E402

TOPICS = ("rivers", "glaciers", "bridges", "owls", "comets", "deserts", "violins", "lanterns", "orchards", "tides",
          "harbours", "mosses", "kites", "canyons", "bees", "clocks")


def prompts(n: int) -> list[str]:
    return [f"Write one short sentence about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(n)]


def ask(client, prompt: str, max_tokens: int, hetmem: dict) -> dict:
    t0 = time.perf_counter()
    first, text, usage, report = None, [], None, None
    try:
        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, stream=True, extra_body={"hetmem": hetmem})
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(ch.choices[0].delta.content)
            extra = ch.model_extra or {}
            if ch.usage is not None:  # the last chunk: usage, and the hetmem report beside it
                usage, report = ch.usage.model_dump(), extra.get("hetmem")
            if extra.get("error"):
                raise RuntimeError(extra["error"].get("message"))
        if usage is None:
            raise RuntimeError("the stream ended without usage")
    except Exception as e:  # noqa: BLE001 - counted as an error, the run goes on
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}", "latency": time.perf_counter() - t0}
    t1 = time.perf_counter()
    return {"ok": True, "text": "".join(text), "tokens": usage["completion_tokens"], "latency": t1 - t0,
            "ttft": (first or t1) - t0, "report": report}


def load(url: str, key: str | None, reqs: list[str], clients: int, max_tokens: int, hetmem: dict,
         on_done=None) -> dict:
    made = [openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=600)
            for _ in range(clients)]
    done = [0]
    lock = threading.Lock()

    def one(i):
        r = ask(made[i % clients], reqs[i], max_tokens, hetmem)
        with lock:
            done[0] += 1
            n = done[0]
        if on_done is not None:
            on_done(n, r)
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(one, range(len(reqs))))
    wall = time.perf_counter() - t0
    ok = [r for r in res if r["ok"]]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1e3 if xs else None

    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "ttft_p50_ms": pct(ttft, 0.5),
            "ttft_p99_ms": pct(ttft, 0.99), "errors": len(res) - len(ok), "texts": [r.get("text") for r in res],
            "error_samples": [r["error"] for r in res if not r["ok"]][:5],
            "engine": next((r["report"].get("engine") for r in ok if r.get("report")), None),
            "reports": [r.get("report") for r in ok]}


def figures(rec: Record, key: str, r: dict) -> None:
    rec.figure(f"{key}.tokens_per_s", round(r["tokens_per_s"], 2), "tokens/s")
    rec.figure(f"{key}.p50_latency_ms", None if r["p50_ms"] is None else round(r["p50_ms"], 1), "ms")
    rec.figure(f"{key}.p99_latency_ms", None if r["p99_ms"] is None else round(r["p99_ms"], 1), "ms")
    rec.figure(f"{key}.ttft_p50_ms", None if r["ttft_p50_ms"] is None else round(r["ttft_p50_ms"], 1), "ms",
               note="time to first token, as the streaming client sees it")
    rec.figure(f"{key}.ttft_p99_ms", None if r["ttft_p99_ms"] is None else round(r["ttft_p99_ms"], 1), "ms")
    rec.figure(f"{key}.errors", r["errors"], "requests")
    rec.figure(f"{key}.wall_s", round(r["wall_s"], 2), "s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="N short requests per phase")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--memory-nodes", type=int, default=None, help="K memory nodes (adds the SIGKILL phase)")
    ap.add_argument("--budget", type=int, default=64, help="quest budget (with memory nodes)")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: the cores)")
    args = ap.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rec = Record().setting(**vars(args), model="smollm2", server_threads=threads)
    hetmem = {"method": "dense"} if not args.memory_nodes else {"method": "quest", "budget": args.budget,
                                                               "page_size": 16}
    rec.setting(hetmem=hetmem)
    reqs = prompts(args.requests)

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # a killed benchmark still shuts its Ray Serve down (finally below)
    server = start(ServeConfig(model="smollm2", memory_nodes=args.memory_nodes, port=args.port, threads=threads))
    ok = True
    try:
        load(server.url, None, reqs[:2], 1, args.max_tokens, hetmem)  # warm-up (not recorded)
        print(f"sequential: 1 client x {len(reqs)} requests", file=sys.stderr)
        seq = load(server.url, None, reqs, 1, args.max_tokens, hetmem)
        print(f"  {seq['tokens_per_s']:.1f} tokens/s, errors {seq['errors']}", file=sys.stderr)
        print(f"concurrent: {args.concurrency} clients x {len(reqs)} requests", file=sys.stderr)
        conc = load(server.url, None, reqs, args.concurrency, args.max_tokens, hetmem)
        print(f"  {conc['tokens_per_s']:.1f} tokens/s, errors {conc['errors']}", file=sys.stderr)
        rec.setting(engine=conc["engine"])
        figures(rec, "sequential", seq)
        figures(rec, "concurrent", conc)
        ratio = conc["tokens_per_s"] / seq["tokens_per_s"] if seq["tokens_per_s"] else None
        rec.figure("throughput_ratio", None if ratio is None else round(ratio, 3), "x",
                   note=f"{args.concurrency} concurrent clients / 1 sequential client (target >= 4 with batching)")
        same = seq["texts"] == conc["texts"]
        rec.figure("concurrent.outputs_identical", int(same), "1 = identical", note="greedy, vs the sequential run")
        rec.detail("concurrent_differs", [{"i": i, "sequential": a, "concurrent": b}
                                          for i, (a, b) in enumerate(zip(seq["texts"], conc["texts"])) if a != b][:10])
        ok = ok and conc["errors"] == 0 and seq["errors"] == 0 and same
        print(f"throughput ratio {ratio:.2f}x; outputs identical: {same}", file=sys.stderr)
        if args.memory_nodes:
            pids = next(r["memory_nodes"]["pids"] for r in conc["reports"] if r and r.get("memory_nodes"))
            killed = {}

            def kill_at_half(n, _r):
                if n == len(reqs) // 2 and not killed:
                    killed["pid"] = pids[0]
                    killed["at"] = n
                    os.kill(pids[0], signal.SIGKILL)

            print(f"fault: {args.concurrency} clients x {len(reqs)} requests, SIGKILL node 0 (pid {pids[0]}) "
                  "at half", file=sys.stderr)
            fault = load(server.url, None, reqs, args.concurrency, args.max_tokens, hetmem, on_done=kill_at_half)
            figures(rec, "fault", fault)
            same_f = fault["texts"] == conc["texts"]
            rec.figure("fault.outputs_identical", int(same_f), "1 = identical", note="vs the run without the fault")
            restarts = max((r["memory_nodes"]["restarts"] for r in fault["reports"] if r and r.get("memory_nodes")),
                           default=0)
            rec.figure("fault.node_restarts_seen", restarts, "restarts")
            rec.detail("fault_differs", [{"i": i, "no_fault": a, "fault": b}
                                         for i, (a, b) in enumerate(zip(conc["texts"], fault["texts"])) if a != b][:10])
            rec.detail("fault", {"killed_pid": killed.get("pid"), "after_requests": killed.get("at"),
                                 "errors": fault["error_samples"]})
            ok = ok and fault["errors"] == 0 and same_f and bool(killed)
            print(f"  errors {fault['errors']}, outputs identical: {same_f}, restarts seen: {restarts}",
                  file=sys.stderr)
        rec.detail("errors", {"sequential": seq["error_samples"], "concurrent": conc["error_samples"]})
        rec.detail("sample_outputs", seq["texts"][:3])
    finally:
        server.stop()
    rec.write(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
