import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests point HETMEM_CACHE at temporary folders; the compiled kernels (ops.fast) are built once per machine in
# the user's cache, not again in every temporary one.
os.environ.setdefault("HETMEM_KERNEL_DIR", str(__import__("hetmem.settings", fromlist=["x"]).cache_dir() / "ops"))
