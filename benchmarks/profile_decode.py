"""The decode loop to profile with py-spy (issue 12): SmolLM2, random prompt, METHOD at 1/8 budget.

    py-spy record -r 200 --format raw -o quest.txt -- python benchmarks/profile_decode.py quest 4096 40 1
    python benchmarks/flame_summary.py quest.txt 22 > benchmarks/profiles/quest_decode_after.txt

Arguments: method (dense|quest), prompt tokens, new tokens, step timer on (1) or off (0), and optionally the
model dtype (default auto: the checkpoint's; bf16 as ``hetmem run --dtype bf16``). One torch thread.
"""
import sys, torch
torch.set_num_threads(1)
from hetmem.llm.models import load_model
from hetmem.llm.generate import generate
from hetmem.methods import get_method
from hetmem.core.timer import StepTimer
lm = load_model("smollm2", dtype=sys.argv[5] if len(sys.argv) > 5 else "auto")
ids = torch.randint(1000, 20000, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0))
m = get_method(sys.argv[1], **({"budget": int(sys.argv[2]) // 8} if sys.argv[1] == "quest" else {}))
res = generate(lm.model, ids, m, int(sys.argv[3]), eos_token_ids=set(), progress=False, timer=StepTimer(enabled=sys.argv[4] == "1"))
print("decode ms/token", res.decode_ms / (len(res.token_ids) - 1))
