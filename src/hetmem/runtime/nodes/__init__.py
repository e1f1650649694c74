"""Disaggregated memory: sparse-attention memory on Ray actor memory nodes (docs/disaggregated.md).

    shard.py    pages by position across nodes; the exact global top-k merge; the log-sum-exp merge
    node.py     MemoryNode: a node's shard of every layer (the method's own Prepare/Relevancy run there)
    cluster.py  NodeCluster: Ray actors, socket-channel calls, timeouts, restarts and re-hydration, transfers
    client.py   NodeMethod: the head side, remote proxy steps in the layer's MemoryPipeline (layouts)
"""
