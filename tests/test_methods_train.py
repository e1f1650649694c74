"""Self-distillation of seer gates / dsa indexers: the loss goes down, weights round-trip, CLI wiring."""

import json

import pytest
import torch

from hetmem.cli import main
from hetmem.errors import HetmemError
from hetmem.llm.generate import generate
from hetmem.methods import get_method
from hetmem.testing import save_tiny_model_dir, tiny_model
from hetmem.train.distill import OBJECTIVES, train
from hetmem.methods.gates import save_gates


def blocky(seed: int, n: int = 192, run: int = 8) -> torch.Tensor:
    """Runs of a repeated token: block attention is far from uniform even in a random model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (1, n // run), generator=g).repeat_interleave(run, dim=1)


@pytest.mark.parametrize("name,kw", [("seer", {"page_size": 8}), ("dsa", {"index_heads": 2, "recent": 8})])
def test_training_lowers_the_distillation_loss(name, kw):
    model = tiny_model("llama")
    chunk = blocky(1, n=128)
    obj = OBJECTIVES[name](model, **kw)
    before = {k: v.detach().clone() for k, v in obj.params.items()}
    rec = train(model, obj, [chunk], [chunk], steps=8, lr=2e-2, eval_budget=32, progress=False)
    e = rec["eval"]
    assert e["trained"]["kl"] < e["untrained"]["kl"]
    assert rec["train_loss"][-1] < rec["train_loss"][0]
    assert any(not torch.equal(before[k], v) for k, v in obj.params.items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # base model frozen


def test_untrained_seer_is_pooled_key_scoring():
    from hetmem.methods.seer import identity_gates

    w = identity_gates(2, 2, 16)
    assert torch.equal(w["wq"][1, 0], torch.eye(16)) and torch.equal(w["wk"][0, 1], torch.eye(16))


@pytest.mark.parametrize("name", ["seer", "dsa"])
def test_gates_save_load_round_trip(tmp_path, name):
    model = tiny_model("qwen2")
    obj = OBJECTIVES[name](model, **({"page_size": 16} if name == "seer" else {"index_heads": 4}))
    with torch.no_grad():
        for p in obj.params.values():
            p.add_(0.01 * torch.randn_like(p))
    save_gates(tmp_path / "g", name, obj.export(), obj.meta())
    m = get_method(name, gates=str(tmp_path / "g"))
    m.bind(model)
    for k, v in obj.export().items():
        assert torch.equal(m._w[k], v)
    ids = torch.randint(3, 100, (1, 80), generator=torch.Generator().manual_seed(0))
    res = generate(model, ids, get_method(name, gates=str(tmp_path / "g"), budget=32), 4, progress=False, recall=True)
    assert 0 < res.recall["attention_mass_recall"] <= 1 + 1e-6


def test_bad_gates_are_one_line_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(HetmemError, match="not a directory"):
        get_method("seer", gates=str(tmp_path / "missing")).bind(model)
    save_gates(tmp_path / "d", "dsa", {"x": torch.zeros(1)}, {"index_heads": 4})
    with pytest.raises(HetmemError, match="trained for method 'dsa'"):
        get_method("seer", gates=str(tmp_path / "d")).bind(model)
    save_gates(tmp_path / "s", "seer", {"wq": torch.zeros(2, 2, 8, 8), "wk": torch.zeros(2, 2, 8, 8)}, {})
    with pytest.raises(HetmemError, match="shape"):
        get_method("seer", gates=str(tmp_path / "s")).bind(model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny6") / "m", "llama")


def test_cli_train_then_run_with_gates_and_recall(tmp_path, tiny_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(c * 8 for c in "the quick brown fox jumps over a lazy dog " * 4), encoding="utf-8")
    out = tmp_path / "gates"
    code = main(["train", "--method", "seer", "--model", str(tiny_dir), "--steps", "3", "--seq-len", "128",
                 "--page-size", "8", "--text", str(text), "--out", str(out), "--json"])
    assert code == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["method"] == "seer" and rec["page_size"] == 8 and len(rec["train_loss"]) == 3
    assert (out / "gates.safetensors").is_file()
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("alpha beta gamma delta " * 12, encoding="utf-8")
    code = main(["run", "--method", "seer", "--model", str(tiny_dir), "--gates", str(out), "--page-size", "8",
                 "--budget", "32", "--context", str(ctx), "--question", "q?", "--max-new-tokens", "3", "--json", "--recall"])
    assert code == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["params"]["gates"] == str(out)
    assert 0 < rec["recall"]["attention_mass_recall"] <= 1 + 1e-6
    assert len(rec["recall"]["recall_per_layer"]) == 2
    # a mismatched block size is refused with one line
    code = main(["run", "--method", "seer", "--model", str(tiny_dir), "--gates", str(out), "--page-size", "16",
                 "--context", str(ctx), "--question", "q?", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "page-size" in err and "Traceback" not in err


def test_cli_methods_json_lists_all_with_defaults(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["h2o"]["params"] == {"budget": 1024, "heavy_ratio": 0.5, "sink": 0}
    assert rows["kvquant"]["params"] == {"bits": 4, "group_size": 32, "residual": 128, "measure_error": 0}
    assert rows["dsa"]["params"]["index_heads"] == 4 and rows["seer"]["params"]["gates"] is None
    for name in ("oracle", "streaming", "snapkv"):
        assert rows[name]["family"] in ("sparse-attention", "compressed-kv")


def test_cli_run_compressed_method_reports_memory(tmp_path, tiny_dir, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("alpha beta gamma delta " * 12, encoding="utf-8")
    code = main(["run", "--method", "kvquant", "--bits", "8", "--group-size", "8", "--residual", "8",
                 "--measure-error", "1", "--model", str(tiny_dir),
                 "--context", str(ctx), "--question", "q?", "--max-new-tokens", "3", "--json", "--recall"])
    assert code == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["memory"]["kv_quant_rel_error"]["k"] > 0 and rec["memory"]["source"] == "measured"
    assert rec["recall"]["attention_mass_recall"] is None
    code = main(["run", "--method", "kvquant", "--bits", "3", "--model", str(tiny_dir), "--context", str(ctx),
                 "--question", "q?"])
    assert code == 2 and "--bits" in capsys.readouterr().err
