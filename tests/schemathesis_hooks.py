"""Schemathesis hooks for tests/test_server_fuzz.py: generation requests stay short (at most 4 new tokens, and 4 when
the body sets none, since the server's default is the rest of the context), so the fuzz run stays within minutes. A
value the document forbids (over CONTEXT - 1, or not an integer) is left alone: it is what a negative case tests."""
import schemathesis

MAX_TOKENS = 4
CONTEXT = 1024  # the fuzzed server's max_model_len


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and MAX_TOKENS < value < CONTEXT:
                body[name] = MAX_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
    return body
