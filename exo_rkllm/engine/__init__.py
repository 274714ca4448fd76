"""The engine: legacy exo's InferenceEngine contract over the scheduler, and embeddings."""
