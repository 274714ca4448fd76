"""Runtime backends behind one protocol (see base.py); `create_runtime` picks one from the config."""
from .base import (CallState, Capabilities, ChatMessage, EventBridge, FinishEvent, GenerationInput,
                   GenerationStats, ModelSpec, Runtime, RuntimeEvent, SamplingParams, TokenEvent)

__all__ = [
    "CallState", "Capabilities", "ChatMessage", "EventBridge", "FinishEvent", "GenerationInput",
    "GenerationStats", "ModelSpec", "Runtime", "RuntimeEvent", "SamplingParams", "TokenEvent",
]
