"""Which board of a ring runs a request: what each node has and does, and the choice made from it.

Pure code (no exo, no I/O): exo_rkllm/exo_glue/ring.py carries the states between nodes as exo peer
messages and acts on the choice."""
