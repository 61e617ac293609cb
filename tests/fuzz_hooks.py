"""Schemathesis hooks for tests/service/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS): real
ids half the time, so chat, feedback and the exchange view are fuzzed past "not found"; tiny
answers, so the budget goes to inputs, not generation; and the OpenAI error-shape check."""
import json
import os
import random

import schemathesis

RESPONSE_IDS = os.environ.get("FUZZ_RESPONSE_IDS", "").split(",")
PROTECTED_KEY_IDS = {int(i) for i in os.environ.get("FUZZ_PROTECTED_KEY_IDS", "").split(",") if i}
MAX_TOKENS = 4


def _real_id() -> str:
    return random.choice(RESPONSE_IDS)


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    """Imports take JSONL: generated strings go as they are (lone surrogates as the bytes they
    would be), anything else as one JSON line."""
    if isinstance(value, bytes):
        return {"data": value}
    if isinstance(value, str):
        return {"data": value.encode("utf-8", "surrogatepass")}
    return {"data": (json.dumps(value) + "\n").encode()}


@schemathesis.hook
def map_body(context, body):
    path = context.operation.path if context.operation else ""
    if not isinstance(body, dict):
        return body
    if path == "/v1/chat/completions":
        if random.random() < 0.7:
            body["model"] = random.choice(["feedloop", "v1"])
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and body[field] > MAX_TOKENS:
                body[field] = MAX_TOKENS
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_completion_tokens"] = MAX_TOKENS
    elif path in ("/v1/feedback", "/v1/rankings") and random.random() < 0.5:
        body["response_id"] = _real_id()
    elif path == "/v1/preferences" and random.random() < 0.5:
        for side in ("chosen", "rejected"):
            if isinstance(body.get(side), dict):
                body[side]["response_id"] = _real_id()
    return body


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    path = context.operation.path if context.operation else ""
    if not isinstance(path_parameters, dict):
        return path_parameters
    if path == "/v1/admin/exchanges/{response_id}" and random.random() < 0.5:
        path_parameters["response_id"] = _real_id()
    if path == "/v1/admin/keys/{key_id}" and path_parameters.get("key_id") in PROTECTED_KEY_IDS:
        path_parameters["key_id"] = 10**9  # the fuzzing's own keys stay
    return path_parameters


@schemathesis.check
def openai_error_shape(ctx, response, case):
    """Every error is OpenAI's {"error": {"message", "type", "param", "code"}}: message and type
    strings, param and code strings or null."""
    if response.status_code < 400:
        return None
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{response.status_code} without OpenAI's error shape: {response.content[:200]!r}")
    if not (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
            and all(error[k] is None or isinstance(error[k], str) for k in ("param", "code"))):
        raise AssertionError(f"{response.status_code} with a malformed error: {error!r}")
    return None
