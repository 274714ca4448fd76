"""The error shape clients display: OpenAI's object, statuses and types, paths redacted, and the
mid-stream chunk Open WebUI shows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exo_rkllm import errors as engine_errors
from exo_rkllm.api.errors import APIError, error_chunk, error_response, redact_paths


def test_the_body_is_exactly_openais_shape():
    err = APIError(400, "'messages[2].content' must be a string", param="messages[2].content", code="invalid_type")
    assert err.body() == {"error": {"message": "'messages[2].content' must be a string",
                                    "type": "invalid_request_error", "param": "messages[2].content",
                                    "code": "invalid_type"}}
    assert (err.status, err.message, err.param, err.code) == (400, err.body()["error"]["message"],
                                                               "messages[2].content", "invalid_type")
    assert str(err) == err.message
    assert APIError(418, "x").body() == {"error": {"message": "x", "type": "invalid_request_error",
                                                   "param": None, "code": None}}


@pytest.mark.parametrize("status,kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                         (403, "permission_error"), (404, "not_found_error"),
                                         (409, "invalid_request_error"), (429, "rate_limit_error"),
                                         (499, "invalid_request_error"), (500, "server_error"),
                                         (503, "server_error")])
def test_the_type_follows_the_status(status, kind):
    assert APIError(status, "m").type == kind
    assert APIError(status, "m", type="custom").type == "custom"


@pytest.mark.parametrize("exc,status,code", [
    (engine_errors.ModelNotFound("no model 'x'"), 404, "model_not_found"),
    (engine_errors.QueueFull("busy"), 429, "QueueFull"),
    (engine_errors.RequestCancelled("gone"), 499, "RequestCancelled"),
    (engine_errors.ShuttingDown("stopping"), 503, "ShuttingDown"),
    (engine_errors.NPUBusy("busy"), 409, "npu_busy"),
    (engine_errors.EmbeddingUnsupported("no"), 400, "embeddings_unsupported"),
])
def test_engine_errors_keep_their_status_and_code(exc, status, code):
    err = APIError.from_rkllm(exc)
    assert (err.status, err.code, err.message) == (status, code, str(exc))
    assert err.body()["error"]["code"] == code


def test_paths_under_the_models_folder_are_made_relative(tmp_path):
    models = tmp_path / "models"
    (models / "Qwen").mkdir(parents=True)
    exc = engine_errors.ModelUnavailable(f"cannot load the tokenizer from {models}/Qwen/tok: missing; "
                                         f"the folder {models} has no file named '{models / 'Qwen' / 'x.rkllm'}'")
    err = APIError.from_rkllm(exc, redact=[models])
    assert str(tmp_path) not in err.message
    assert err.message == ("cannot load the tokenizer from Qwen/tok: missing; the folder models has no file "
                           "named 'Qwen/x.rkllm'")
    assert err.status == 409 and err.code == "model_unavailable"


def test_redaction_matches_whole_folders_only_and_every_spelling(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert redact_paths(f"{real}2/a and {real}.bak/b", [real]) == f"{real}2/a and {real}.bak/b"
    assert redact_paths(f"see {real}/m/f.json.", [link]) == "see m/f.json."  # resolved form of the root
    assert redact_paths(f"in {real}.", [real]) == "in real."
    nested = real / "inner"
    assert redact_paths(f"{nested}/x", [real, nested]) == "x"  # the most specific root wins
    assert redact_paths("nothing here", [real]) == "nothing here"
    assert redact_paths(f"{real}/x", ["relative/root"]) == f"{real}/x"  # only absolute roots


async def test_error_response_is_json_with_the_status():
    err = APIError(404, "no model 'x'", param="model", code="model_not_found")
    response = error_response(err)
    assert response.status == 404 and response.content_type == "application/json"
    assert json.loads(response.body) == err.body()
    assert error_response(APIError(499, "gone")).status == 499


def test_the_stream_error_chunk_is_what_open_webui_displays():
    """Open WebUI's stream handler only looks at `error` in a chunk whose `choices` is empty,
    and the page shows `error.message`."""
    err = APIError(500, "the NPU stopped", code="GenerationError")
    chunk = error_chunk(err, id="chatcmpl-1", created=1700000000, model="qwen")
    assert chunk == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                     "model": "qwen", "choices": [], "error": err.body()["error"]}
    assert error_chunk(err, id="cmpl-1", created=1, model="m", object="text_completion")["object"] == \
        "text_completion"
    json.dumps(chunk)  # serialisable as an SSE data line
