"""``hetmem serve``: the OpenAI-compatible HTTP front (app.py), the RAG memories it loads (memories.py) and its
Ray Serve deployment (deploy.py). The top layer under the CLI: it builds on runtime's engines and nodes."""
