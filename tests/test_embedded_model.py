"""One short test on a real embedded model (SmolLM2-135M): a passkey found with dense and with quest."""

import pytest

from hetmem.tasks.haystack import passkey_task
from hetmem.llm.models import load_model
from hetmem.llm.run import answer_question
from hetmem.methods import get_method

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


def test_smollm2_finds_passkey_dense_and_quest(smol):
    assert smol.model.config.model_type == "llama" and smol.max_context == 8192
    task = passkey_task(smol.tokenizer, 1000, seed=7, depth=0.5)
    dense = answer_question(smol, get_method("dense"), task.context, task.question, 12, progress=False)
    quest = answer_question(smol, get_method("quest", budget=512), task.context, task.question, 12, progress=False)
    assert task.passkey in dense["answer"], dense["answer"]
    assert task.passkey in quest["answer"], quest["answer"]
    assert quest["tokens"]["prompt"] > 1000
    assert quest["steps"]["relevancy"]["calls"] > 0
