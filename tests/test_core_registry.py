"""Step roles and kinds: every method step class is the cpu/cuda implementation of its kind, other devices
register kernels for kinds, and the placement executor builds whatever the registry holds."""

import importlib
import inspect
import pkgutil

import pytest

import hetmem.methods
import hetmem.runtime.fpga_steps  # noqa: F401  (registers the fpga-emu kernels)
from hetmem.core import registry
from hetmem.core.registry import devices_for, impl_for, kinds, register_impl
from hetmem.core.steps import STEP_NAMES
from hetmem.core.timer import StepTimer
from hetmem.errors import HetmemError
from hetmem.methods import get_method
from hetmem.runtime.executor import place

MAIN_CALL = {"prepare": "prepare", "relevancy": "score", "retrieval": "select", "apply": "apply"}
FPGA_KINDS = {"quest-score": "relevancy", "page-topk": "retrieval", "lightning-indexer": "relevancy",
              "token-topk-shared": "retrieval", "gate-score": "relevancy", "block-select": "retrieval"}


def _method_step_classes():
    """Every class defined in a hetmem.methods module that has one of the four step calls."""
    out = []
    for m in pkgutil.iter_modules(hetmem.methods.__path__):
        mod = importlib.import_module(f"hetmem.methods.{m.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and any(callable(getattr(cls, f, None)) for f in MAIN_CALL.values()):
                out.append(cls)
    return out


def test_every_method_step_declares_its_own_kind_and_is_its_default():
    classes = _method_step_classes()
    assert len(classes) >= 25  # quest, seer, dsa, oracle, the compressed and RAG methods
    for cls in classes:
        assert "kind" in cls.__dict__, f"{cls.__qualname__} inherits its kind: declare its own with register_impl"
        assert cls.role in STEP_NAMES and callable(getattr(cls, MAIN_CALL[cls.role])), cls
        assert impl_for(cls.kind, "cpu") is cls and impl_for(cls.kind, "cuda") is cls, cls
    assert len({c.kind for c in classes}) == len(classes)  # one kind per class


def test_fpga_kernels_are_registered_by_kind():
    table = kinds()
    for kind, role in FPGA_KINDS.items():
        fpga = impl_for(kind, "fpga-emu")
        assert fpga is not None and fpga.role == role and table[kind]["role"] == role
        assert impl_for(kind, "cpu") is not None  # the method's own step is the default
        assert table[kind]["devices"]["fpga-emu"].startswith("hetmem.runtime.fpga_steps.")
    assert devices_for("gather-attention") == ["cpu", "cuda"]


@pytest.fixture
def scratch_registry():
    saved, roles = dict(registry._IMPLS), dict(registry._ROLES)
    yield
    registry._IMPLS.clear()
    registry._IMPLS.update(saved)
    registry._ROLES.clear()
    registry._ROLES.update(roles)


def test_register_impl_refuses_clashes(scratch_registry):
    with pytest.raises(ValueError, match="role must be one of"):
        register_impl("x-kind", role="rank")
    with pytest.raises(ValueError, match="is a relevancy step, not retrieval"):
        register_impl("quest-score", "other-dev", role="retrieval")

    class Another:
        pass

    with pytest.raises(ValueError, match="already implemented by hetmem.methods.quest.QuestRelevancy"):
        register_impl("quest-score", "cpu", role="relevancy")(Another)


def test_executor_builds_the_registered_implementation(scratch_registry):
    method = get_method("quest", dense_layers=0)
    placed, _, ledger = place(method, {"devices": {"relevancy": "u55c", "retrieval": "fpga-emu", "apply": "cpu"}})
    pipe = placed.pipeline("cpu", StepTimer())
    assert type(pipe.relevancy) is impl_for("quest-score", "fpga-emu") and pipe.relevancy.inner.kind == "quest-score"
    assert type(pipe.retrieval) is impl_for("page-topk", "fpga-emu") and pipe.relevancy.ledger is ledger
    assert type(pipe.apply) is impl_for("gather-attention", "cpu") and type(pipe.prepare).kind == "page-minmax"

    # no fpga-emu kernel for gather-attention: refused in one line ...
    placed, _, _ = place(method, {"devices": {"apply": "u55c"}})
    with pytest.raises(HetmemError, match=r"apply step \(gather-attention\) has no fpga-emu kernel; place it on cpu or cuda"):
        placed.pipeline("cpu", StepTimer())

    # ... until one is registered: a new kernel needs no change to the executor
    @register_impl("gather-attention", "fpga-emu", role="apply")
    class FpgaGather:
        def __init__(self, inner, ledger, timer):
            self.inner, self.ledger, self.timer, self.device, self.name = inner, ledger, timer, "fpga-emu", "test"

    pipe = placed.pipeline("cpu", StepTimer())
    assert isinstance(pipe.apply, FpgaGather) and pipe.apply.inner.kind == "gather-attention"
