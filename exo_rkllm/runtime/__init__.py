"""Runtime backends behind one protocol (see base.py); `create_runtime` picks one from the config."""
from exo_rkllm.runtime.base import (CallState, Capabilities, ChatMessage, EventBridge, FinishEvent, FinishKind, GenerationInput,
                   GenerationStats, ModelSpec, Runtime, RuntimeBase, RuntimeEvent, SamplingParams, TokenEvent)

__all__ = [
    "CallState", "Capabilities", "ChatMessage", "EventBridge", "FinishEvent", "FinishKind", "GenerationInput",
    "GenerationStats", "ModelSpec", "Runtime", "RuntimeBase", "RuntimeEvent", "SamplingParams", "TokenEvent",
]
