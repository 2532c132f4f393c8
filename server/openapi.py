"""The OpenAPI document, generated from the same msgspec types the server decodes and encodes (msgspec emits their
JSON Schema), so the published contract is what the server does: request bodies, JSON and server-sent-event answers,
and every error status with OpenAI's error object."""
import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.schemas import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelList,
    ReloadResponse,
)

TYPES = (CompletionRequest, ChatRequest, CompletionResponse, ChatResponse, ChatChunk, ErrorResponse, Health,
         ModelList, ReloadResponse)
ERRORS = {
    400: "Bad input: the error's `param` names the field (a prompt too long, a value out of range, ...).",
    401: "Missing or wrong API key (the server was started with --api-key).",
    404: "The body names a model this server does not serve (`code`: model_not_found).",
    409: "Nothing to reload: no DSpark draft with a confidence head, or its sts.json is missing or malformed.",
    413: "The body is over --max-body-bytes.",
    503: "At capacity (retry after the Retry-After header's seconds) or shutting down.",
}
SSE = "A stream of server-sent events: `data: <chunk as JSON>` lines, then `data: [DONE]`."
SSE_EVENT = {"type": "object", "required": ["data"], "description": "One server-sent event.",
             "properties": {"event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
                            "data": {"type": "string", "description": "A chunk as JSON, or [DONE] at the end."}}}


def ref(schema: type) -> dict:
    return {"$ref": f"#/components/schemas/{schema.__name__}"}


def json_content(schema: type) -> dict:
    return {"application/json": {"schema": ref(schema)}}


def errors(*statuses: int) -> dict:
    return {str(s): {"description": ERRORS[s], "content": json_content(ErrorResponse)} for s in statuses}


def generation(request: type, answer: type, chunk: type) -> dict:
    return {
        "requestBody": {"required": True, "content": json_content(request)},
        "responses": {"200": {"description": f"The answer ({answer.__name__}), or with `stream: true` {SSE} "
                                             f"(each a {chunk.__name__})",
                              "content": {**json_content(answer), "text/event-stream": {"schema": SSE_EVENT}}},
                      **errors(400, 401, 404, 413, 503)}}


def document(app: FastAPI) -> dict:
    """Built once per app: FastAPI's skeleton of the routes, with every body and answer filled in."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    _, components = msgspec.json.schema_components(TYPES, ref_template="#/components/schemas/{name}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
    bound_by_the_model(components, app.state.prompts.vocab_size, app.state.prompts.max_model_len)
    plain = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    operations = {
        ("/v1/completions", "post"): generation(CompletionRequest, CompletionResponse, CompletionResponse),
        ("/v1/chat/completions", "post"): generation(ChatRequest, ChatResponse, ChatChunk),
        ("/v1/models", "get"): {"responses": {"200": {"description": "The served model.",
                                                      "content": json_content(ModelList)}, **errors(401, 413)}},
        ("/health", "get"): {"responses": {"200": {"description": "Serving.", "content": json_content(Health)},
                                           "503": {"description": "The engine has stopped.",
                                                   "content": json_content(Health)}}},
        ("/metrics", "get"): {"responses": {"200": {"description": "Prometheus text exposition.", **plain},
                                            **errors(401, 413)}},
        ("/admin/reload-calibration", "post"): {"responses": {
            "200": {"description": "The draft's sts.json was read again; its calibration version.",
                    "content": json_content(ReloadResponse)}, **errors(401, 409, 413)}},
    }
    if app.state.options.api_key:  # then every route but /health wants it
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, method in operations:
            if path != "/health":
                operations[path, method]["security"] = [{"bearer": []}]
    for (path, method), fields in operations.items():
        doc["paths"][path][method] |= fields
    app.openapi_schema = doc
    return doc


def bound_by_the_model(components: dict, vocab: int, context: int):
    """What the served model bounds: token ids by its vocabulary, new tokens by its context (less the one-token
    shortest prompt)."""
    for option in components["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        if option.get("type") == "array":
            option["items"]["maximum"] = vocab - 1
    for request, field in (("CompletionRequest", "max_tokens"), ("ChatRequest", "max_tokens"),
                           ("ChatRequest", "max_completion_tokens")):
        for option in components[request]["properties"][field]["anyOf"]:
            if option.get("type") == "integer":
                option["maximum"] = context - 1
