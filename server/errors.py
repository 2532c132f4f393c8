"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""
import re

import msgspec
from fastapi.responses import Response

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                409: "conflict_error", 413: "invalid_request_error", 500: "internal_server_error",
                503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 code: str | int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.code, self.kind = code, kind  # OpenAI's own code and type where they differ from the status's


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None,
               kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status if code is None else code}}


def error_response(err: APIError) -> Response:
    body = error_body(err.status, err.message, err.param, err.code, err.kind)
    return Response(msgspec.json.encode(body), err.status, headers=err.headers, media_type="application/json")


def from_validation(err: msgspec.ValidationError | msgspec.DecodeError, body: bytes) -> APIError:
    """msgspec says '... - at `$.stream_options.include_usage`'; the path after `$.` is the OpenAI `param`. Bodies
    that are no JSON object at all get a plain sentence instead of the decoder's."""
    if not body.strip():
        return APIError(400, "the request body is empty: send a JSON object")
    if not isinstance(err, msgspec.ValidationError):  # a ValidationError is a DecodeError too
        return APIError(400, f"the request body is not valid JSON ({err})")
    found = re.search(r"at `\$\.?([^`]*)`", str(err))
    param = found.group(1) if found else ""
    if not param and str(err).startswith("Expected `object`"):
        return APIError(400, f"the request body must be a JSON object ({err})")
    return APIError(400, str(err), param or None)


def from_value_error(err: ValueError) -> APIError:
    """SamplingParams names the offending field first: 'top_p must be in (0, 1], got 2.0'."""
    word = str(err).split(" ", 1)[0]
    return APIError(400, str(err), word if word.isidentifier() else None)
