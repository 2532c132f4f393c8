"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""
import re

import msgspec
from fastapi.responses import Response

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 500: "internal_server_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def error_response(err: APIError) -> Response:
    return Response(msgspec.json.encode(error_body(err.status, err.message, err.param)), err.status,
                    headers=err.headers, media_type="application/json")


def from_validation(err: msgspec.ValidationError | msgspec.DecodeError) -> APIError:
    """msgspec says '... - at `$.stream_options.include_usage`'; the path after `$.` is the OpenAI `param`."""
    found = re.search(r"at `\$\.?([^`]*)`", str(err))
    param = found.group(1) if found else ""
    return APIError(400, str(err), param or None)


def from_value_error(err: ValueError) -> APIError:
    """SamplingParams names the offending field first: 'top_p must be in (0, 1], got 2.0'."""
    word = str(err).split(" ", 1)[0]
    return APIError(400, str(err), word if word.isidentifier() else None)
