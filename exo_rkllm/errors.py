"""Every failure a user can meet, each with a message that says what to do.

The engine, the API glue and the CLI all report these; keeping them in one
place keeps the wording consistent and lets the plugin map them to HTTP codes.
"""
from __future__ import annotations


class RKLLMError(Exception):
    """Base class. `http_status` and `code` are what the API glue answers with."""

    http_status = 500
    _code: str | None = None

    @property
    def code(self) -> str:
        """The API's error `code`: a stable word for the kind of failure, else the class name."""
        return self._code or type(self).__name__


class ConfigError(RKLLMError):
    http_status = 500


class RuntimeUnavailable(RKLLMError):
    """No NPU runtime / rkllama server could be reached, and no simulator was chosen."""

    http_status = 503


class RuntimeVersionError(RKLLMError):
    http_status = 503


class ModelNotFound(RKLLMError):
    http_status = 404
    _code = "model_not_found"


class ModelUnavailable(RKLLMError):
    """The model exists in the folder but cannot be used (no tokenizer, bad Modelfile...)."""

    http_status = 409
    _code = "model_unavailable"


class ModelLoadError(ModelUnavailable):
    """The runtime refused the model file (missing, corrupt, wrong runtime version). Nothing the
    client can change: the model is unavailable (409), with the runtime's reason."""


class NPUBusy(RKLLMError):
    """An explicit model load or unload while requests run or wait for the NPU: it would take their model away."""

    http_status = 409
    _code = "npu_busy"


class ContextOverflow(RKLLMError):
    http_status = 400


class QueueFull(RKLLMError):
    http_status = 429


class GenerationError(RKLLMError):
    """The runtime reported an error while generating."""

    http_status = 500


class PromptCacheError(RKLLMError):
    """The runtime refused a saved KV state (rkllm_load_prompt_cache failed). Never reaches a client:
    the scheduler drops the file and prefills the prompt instead."""

    http_status = 500


class RequestCancelled(RKLLMError):
    """The request was abandoned (client gone, timeout, shutdown) before it finished."""

    http_status = 499


class NodeLost(RKLLMError):
    """The board of the ring running the request left it (stopped, crashed, unreachable) before the
    answer ended. The other boards go on serving: sending the request again is safe."""

    http_status = 503
    _code = "node_lost"


class NoNodeHasModel(RKLLMError):
    """No live node of the ring has the model's .rkllm file right now (the one that had it left, or
    this node only routes the model). It may come back: 503, not 404."""

    http_status = 503
    _code = "model_not_on_this_node"


class ShuttingDown(RKLLMError):
    """exo is stopping: requests still running or waiting end with this, never as finished answers."""

    http_status = 503


class EmbeddingUnsupported(RKLLMError):
    """The backend, its runtime release or the model cannot give embeddings."""

    http_status = 400
    _code = "embeddings_unsupported"


def error_named(name: object, message: str) -> RKLLMError:
    """The error a peer reported by its class name (so that it keeps its HTTP status and code on the
    node answering the client); a plain RKLLMError for a name this version does not know."""
    cls = globals().get(name) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, RKLLMError):
        try:
            return cls(message)
        except TypeError:
            pass
    return RKLLMError(message)
