"""Memory methods. Each module composes one method's Prepare / Relevancy / Retrieval / Apply steps."""

from hetmem.methods import dense, quest  # noqa: F401  (registration)
from hetmem.methods import dsa, h2o, kvquant, oracle, seer, snapkv, streaming  # noqa: F401,E402
from hetmem.methods import rag_bm25, rag_dense, rag_hybrid  # noqa: F401  (registration)
from hetmem.methods import hmt, lact, memagent  # noqa: F401  (registration)
from hetmem.methods.base import REGISTRY, Method, get_method, param_specs

__all__ = ["REGISTRY", "Method", "get_method", "param_specs"]
