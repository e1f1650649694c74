"""hetmem serve: the OpenAI-compatible front, in-process (FastAPI TestClient: the error table, streaming, stop
strings, sampling, RAG, metrics) and as a real Ray Serve application on a tiny model, called over real HTTP
with the ``openai`` package (one Ray Serve for the module)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hetmem.llm.generate import generate  # noqa: E402
from hetmem.llm.prompt import eos_ids  # noqa: E402
from hetmem.methods import get_method  # noqa: E402
from hetmem.rag.corpus import load_corpus  # noqa: E402
from hetmem.rag.store import save_memory  # noqa: E402
from hetmem.runtime.engine_api import GenRequest, Sampling  # noqa: E402
from hetmem.runtime.rag import RagSession  # noqa: E402
from hetmem.runtime.seq_engine import Detokenizer  # noqa: E402
from hetmem.serve.app import build_app  # noqa: E402
from hetmem.serve.deploy import ServeConfig, build_front, start  # noqa: E402
from hetmem.testing import char_tokenizer, save_tiny_model_dir  # noqa: E402

QUEST = {"method": "quest", "budget": 32, "page_size": 8, "dense_layers": 0}
PROMPT = "The quick brown fox jumps over the lazy dog, and the pass key is"
KEY = "sekret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("serve") / "tiny", seed=1)


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for i, topic in enumerate(("lighthouses", "volcanoes", "saffron")):
        (corpus / f"doc{i}.txt").write_text(f"Notes on {topic}. The guild of {topic} met in hall {i}. " * 2)
    m = get_method("rag-bm25", passage_tokens=24, passage_overlap=4)
    s = RagSession.build(m, load_corpus(corpus, 24, 4, verbose=False))
    return save_memory(tmp_path_factory.mktemp("mem") / "facts", m, s.corpus, s.memory, s.memory_info["build_ms"])


@pytest.fixture(scope="module")
def front(model_dir, memory_dir):
    f = build_front(ServeConfig(model=str(model_dir), memories={"facts": str(memory_dir)}, max_body_bytes=4096))
    yield f
    f.close()


@pytest.fixture(scope="module")
def client(front):
    return TestClient(build_app(front))


def reference(front, text: str, n: int, **method) -> str:
    """Greedy text of ``generate`` on the same model, prompt and method (what the server must answer)."""
    lm = front.lm
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    name = method.pop("method", "dense")
    eos = eos_ids(lm.tokenizer, lm.model)
    res = generate(lm.model, ids, get_method(name, **method), n, eos_token_ids=eos, progress=False)
    out = [t for t in res.token_ids if t not in eos]
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def chat_prompt(content: str) -> str:
    return f"user: {content}\nassistant:"  # the char tokenizer has no chat template


def completion(client, **body):
    r = client.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse(text: str) -> list:
    lines = [ln[len("data: "):] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# -- in-process ---------------------------------------------------------------------------------------------------
def test_completion_greedy_equals_generate_dense_and_quest(client, front):
    for opts in ({}, QUEST):
        out = completion(client, prompt=PROMPT, max_tokens=12, hetmem=opts)
        assert out["choices"][0]["text"] == reference(front, PROMPT, 12, **dict(opts))
        assert out["usage"]["prompt_tokens"] == len(front.lm.tokenizer(PROMPT)["input_ids"])
        assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["finish_reason"] == "length"
        h = out["hetmem"]
        assert h["method"] == opts.get("method", "dense") and h["time_source"] == "measured"
        assert h["steps"]["apply"]["calls"] > 0
    assert out["hetmem"]["steps"]["relevancy"]["calls"] > 0 and out["hetmem"]["params"]["budget"] == 32


def test_stream_equals_non_stream_chat_and_completions(client):
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})):
        whole = client.post(path, json={"model": "t", "max_tokens": 9, **body}).json()
        r = client.post(path, json={"model": "t", "max_tokens": 9, "stream": True, **body})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r.text)
        if "messages" in body:
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert text == whole["choices"][0]["message"]["content"]
        else:
            text = "".join(c["choices"][0]["text"] for c in chunks)
            assert text == whole["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 9
        assert chunks[-1]["hetmem"]["steps"]["apply"]["calls"] > 0


def test_stop_string_cuts_the_text(client, front):
    full = reference(front, PROMPT, 12)
    stop = full[4:6]
    out = completion(client, prompt=PROMPT, max_tokens=12, stop=[stop])
    assert out["choices"][0]["text"] == full[: full.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_detokenizer_holds_back_a_possible_stop_start():
    tok = char_tokenizer()
    d = Detokenizer(tok, ("xyz",))
    pieces = [d.add(i) for i in tok("abxyxyzq")["input_ids"]]
    assert "".join(pieces) == "abxy" and d.stopped
    d = Detokenizer(tok, ("xyz",))
    pieces = [d.add(i) for i in tok("abxy")["input_ids"]]
    assert "".join(pieces) == "ab" and d.flush() == "xy"


def test_seeded_sampling_is_reproducible(client):
    a = completion(client, prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    b = completion(client, prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    c = completion(client, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=6)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] != c["choices"][0]["text"]


def test_rag_through_a_memory(client):
    out = completion(client, prompt="Where did the guild of saffron meet?", max_tokens=4,
                     hetmem={"memory": "facts", "top_k": 2})
    rag = out["hetmem"]["rag"]
    assert rag["memory"] == "facts" and rag["method"] == "rag-bm25" and rag["params"]["top_k"] == 2
    assert len(rag["retrieved"]) == 2 and "doc2" in rag["retrieved"][0]["source"]
    assert rag["steps"]["relevancy"]["calls"] == 1 and rag["retrieved"][0]["in_prompt"]
    assert out["usage"]["prompt_tokens"] > 100  # the passages are in the prompt
    chat = client.post("/v1/chat/completions", json={"model": "t", "max_tokens": 4, "hetmem": {"memory": "facts"},
                                                     "messages": [{"role": "user", "content": "volcanoes?"}]}).json()
    assert "doc1" in chat["hetmem"]["rag"]["retrieved"][0]["source"]


GOOD = {"model": "t", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
ERRORS = [
    ("unknown method", {**GOOD, "hetmem": {"method": "nope"}}, 400, "unknown method"),
    ("unknown memory", {**GOOD, "hetmem": {"memory": "nope"}}, 400, "unknown memory"),
    ("bad parameter", {**GOOD, "hetmem": {"method": "quest", "budget": -1}}, 400, "budget"),
    ("parameter of another method", {**GOOD, "hetmem": {"method": "dense", "budget": 64}}, 400, "budget"),
    ("RAG parameter out of range", {**GOOD, "hetmem": {"memory": "facts", "top_k": 0}}, 400, "top"),
    ("method that does not run in the model", {**GOOD, "hetmem": {"method": "memagent"}}, 400, "inside the model"),
    ("prompt over the window", {**GOOD, "messages": [{"role": "user", "content": "y" * 1500}]}, 400, "window"),
    ("max_tokens over the window", {**GOOD, "max_tokens": 600}, 400, "window"),
    ("empty message list", {**GOOD, "messages": []}, 400, "messages"),
    ("no messages", {"model": "t"}, 400, "messages"),
    ("empty messages", {**GOOD, "messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ("bad max_tokens", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("bad temperature", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("n > 1", {**GOOD, "n": 2}, 400, "n must be 1"),
    ("body not an object", [1, 2], 400, "JSON object"),
    ("oversized body", {**GOOD, "messages": [{"role": "user", "content": "z" * 5000}]}, 413, "limit"),
]


@pytest.mark.parametrize("what,body,status,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_table(client, what, body, status, words):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"]
    assert client.post("/v1/chat/completions", json=GOOD).status_code == 200  # still serving


def test_non_json_and_empty_prompt(client):
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/completions", json={"model": "t", "prompt": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_too_many_pending_is_429(client, front):
    front.pending, keep = front.max_pending, front.pending
    try:
        r = client.post("/v1/chat/completions", json=GOOD)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        front.pending = keep
    assert client.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_cancel_frees_the_running_request(front):
    eng, events, started = front.engine, [], threading.Event()

    def on(ev):
        events.append(ev)
        started.set()

    ids = front.lm.tokenizer(PROMPT)["input_ids"]
    eng.submit(GenRequest("c1", ids, "dense", {}, Sampling(max_tokens=400)), on)
    assert started.wait(30)
    eng.cancel("c1")
    t0 = time.monotonic()
    while eng.stats()["running"] and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    assert not eng.stats()["running"] and len(events) < 400 and all(e.finish_reason is None for e in events)


def test_metrics_parse(client):
    completion(client, prompt=PROMPT, max_tokens=3, hetmem=QUEST)
    r = client.get("/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("hetmem_step_seconds", "hetmem_transfer_bytes", "hetmem_tokens_per_second", "hetmem_queue_depth",
                 "hetmem_running_batch_size", "hetmem_generated_tokens", "hetmem_time_to_first_token_seconds"):
        assert name in fams, sorted(fams)
    labels = {(s.labels.get("method"), s.labels.get("step"), s.labels.get("device"))
              for s in fams["hetmem_step_seconds"].samples if s.name.endswith("_count")}
    assert ("quest", "relevancy", "cpu") in labels and ("quest", "apply", "cpu") in labels


def test_api_key(model_dir):
    f = build_front(ServeConfig(model=str(model_dir), api_key=KEY))
    try:
        c = TestClient(build_app(f))
        assert c.post("/v1/chat/completions", json=GOOD).status_code == 401
        r = c.post("/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401 and c.get("/health").status_code == 200
        assert c.post("/v1/chat/completions", json=GOOD, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        f.close()


# -- a real Ray Serve application, called with the openai client ---------------------------------------------------
@pytest.fixture(scope="module")
def served(model_dir, memory_dir):
    server = start(ServeConfig(model=str(model_dir), memories={"facts": str(memory_dir)}, port=free_port(),
                               api_key=KEY, threads=1, max_body_bytes=4096))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_over_ray_serve(served, oai, front):
    assert oai.models.list().data[0].id == str(front.engine.model_name)
    ref = reference(front, PROMPT, 10)
    c = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10)
    assert c.choices[0].text == ref and c.usage.completion_tokens == 10
    assert c.model_extra["hetmem"]["steps"]["apply"]["calls"] > 0
    parts = [ch.choices[0].text for ch in oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, stream=True)]
    assert "".join(parts) == ref
    q = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, extra_body={"hetmem": QUEST})
    assert q.choices[0].text == reference(front, PROMPT, 10, **dict(QUEST))
    assert q.model_extra["hetmem"]["steps"]["relevancy"]["calls"] > 0
    msgs = [{"role": "user", "content": PROMPT}]
    chat = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=8)
    assert chat.choices[0].message.content == reference(front, chat_prompt(PROMPT), 8)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, stream=True))
    assert streamed == chat.choices[0].message.content
    rag = oai.chat.completions.create(model="tiny", max_tokens=3, extra_body={"hetmem": {"memory": "facts", "top_k": 1}},
                                      messages=[{"role": "user", "content": "Tell me about lighthouses"}])
    assert "doc0" in rag.model_extra["hetmem"]["rag"]["retrieved"][0]["source"]


def test_errors_over_http(served, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="t", messages=[{"role": "user", "content": "x"}], extra_body={"hetmem": {"method": "nope"}})
    assert e.value.status_code == 400 and "unknown method" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="t", messages=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    assert httpx.post(served.url + "/v1/completions", content=b"not json", headers=h).status_code == 400
    big = httpx.post(served.url + "/v1/completions", content=json.dumps({"prompt": "a" * 10000}), headers=h)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert httpx.post(served.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert oai.completions.create(model="t", prompt="hi", max_tokens=2).usage.completion_tokens >= 1  # still serving


def test_client_disconnect_mid_stream_frees_the_request(served):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "t", "prompt": "hi", "max_tokens": 480, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=h, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first chunk, then hang up
    t0, cancelled, running = time.monotonic(), 0, 1
    while time.monotonic() - t0 < 30 and not (cancelled and not running):
        time.sleep(0.2)
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
        cancelled = sum(s.value for s in fams["hetmem_requests"].samples
                        if s.name == "hetmem_requests_total" and s.labels["status"] == "cancelled")
        running = httpx.get(served.url + "/health").json()["running"]
    assert cancelled == 1 and running == 0


def test_16_concurrent_clients(served, oai, front):
    prompts = [f"{PROMPT} {i}" for i in range(16)]

    def ask(p):
        return oai.completions.create(model="t", prompt=p, max_tokens=6).choices[0].text

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(ask, prompts))
    assert got == [reference(front, p, 6) for p in prompts]
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
    ok = sum(s.value for s in fams["hetmem_requests"].samples
             if s.name == "hetmem_requests_total" and s.labels["status"] == "ok")
    assert ok >= 16


def test_memory_nodes_behind_the_front(served, model_dir, front):
    """--memory-nodes: quest's memory on a Ray memory node (the Ray Serve runs on): same greedy text as in-process,
    transfers in the report and in /metrics; a node SIGKILLed between requests comes back."""
    f = build_front(ServeConfig(model=str(model_dir), memory_nodes=1))
    try:
        c = TestClient(build_app(f))
        ref = reference(front, PROMPT, 8, **dict(QUEST))
        out = completion(c, prompt=PROMPT, max_tokens=8, hetmem=QUEST)
        assert out["choices"][0]["text"] == ref
        mn = out["hetmem"]["memory_nodes"]
        assert mn["n"] == 1 and mn["transfers_total"]["decode"]["bytes_to_node"] > 0
        cluster = f.engine.cluster
        cluster.kill(0)
        assert completion(c, prompt=PROMPT, max_tokens=8, hetmem=QUEST)["choices"][0]["text"] == ref
        fams = {m.name: m for m in text_string_to_metric_families(c.get("/metrics").text)}
        moved = {s.labels["direction"]: s.value for s in fams["hetmem_transfer_bytes"].samples if s.name.endswith("_total")}
        assert moved["head_to_node"] > 0 and moved["node_to_head"] > 0
    finally:
        f.close()


# -- the CLI -----------------------------------------------------------------------------------------------------
def test_cli_bad_input_is_one_line(model_dir, tmp_path, capsys):
    from hetmem.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        cases = [
            (["--model", str(model_dir), "--port", str(taken)], "in use"),
            (["--model", str(model_dir), "--memory", f"m={tmp_path / 'none'}"], "does not exist"),
            (["--model", str(model_dir), "--memory", "nameonly"], "NAME=DIR"),
            (["--model", str(tmp_path / "nomodel")], "unknown model"),
            (["--model", str(model_dir), "--memory-nodes", "0"], "at least 1"),
            (["--model", str(model_dir), "--memory-nodes", "1", "--ray-address", "x:1"], "not both"),
        ]
        for args, words in cases:
            assert main(["serve", *args]) == 2
            err = capsys.readouterr().err
            assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.embedded
def test_smollm2_passkey_through_hetmem_serve_then_ctrl_c(tmp_path):
    """The done-when of issue 10 on the embedded model: `hetmem serve --model smollm2`, an openai client asks
    for a passkey hidden in its own context with dense and with quest, then Ctrl-C stops the server cleanly."""
    from hetmem.llm.models import load_model
    from hetmem.tasks.haystack import passkey_task

    task = passkey_task(load_model("smollm2").tokenizer, 1000, seed=7, depth=0.5)
    port = free_port()
    code = "import sys; from hetmem.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", "smollm2", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        for _ in range(240):
            try:
                c.models.list()
                break
            except (openai.APIConnectionError, openai.NotFoundError):  # Ray Serve's proxy answers 404 until the app is up
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        msgs = [{"role": "user", "content": f"{task.context.strip()}\n\n{task.question.strip()}"}]
        for opts in ({"method": "dense"}, {"method": "quest", "budget": 512}):
            r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, extra_body={"hetmem": opts})
            assert task.passkey in r.choices[0].message.content, (opts, r.choices[0].message.content)
    finally:
        proc.send_signal(2)  # Ctrl-C
        rc = proc.wait(timeout=90)
    assert rc == 0 and "shutting down" in proc.stderr.read()


def test_requests_route_to_the_batch_engine_or_one_at_a_time(client):
    """make_engine's router: per-step methods run in the continuous-batching engine over the page pool; a method
    whose Prepare observes prefill queries (snapkv) runs one request at a time, with the same API."""
    out = completion(client, prompt=PROMPT, max_tokens=4, hetmem=QUEST)
    assert out["hetmem"]["engine"] == "batch (page pool)"
    out = completion(client, prompt=PROMPT, max_tokens=4, hetmem={"method": "snapkv", "budget": 32, "window": 8})
    assert out["hetmem"]["engine"] != "batch (page pool)" and out["usage"]["completion_tokens"] >= 1
    assert client.get("/health").json()["engine"] == "batch+sequential"
