"""The online side: the OpenAI-compatible API, feedback capture, generation engines, hot swap."""
