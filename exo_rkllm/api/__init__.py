"""The OpenAI-compatible surface for rkllm models."""
