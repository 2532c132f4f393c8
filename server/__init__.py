"""OpenAI-compatible HTTP server around one LLMEngine: `python -m server` / `dspark-serve`."""
