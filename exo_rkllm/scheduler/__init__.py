"""The NPU of this node: one generation at a time, priorities and preemption, KV-prefix reuse,
the per-request streams, model lifecycle and the model cache."""
