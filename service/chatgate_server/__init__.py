"""chatgate: a gRPC gateway in front of the OpenAI Chat Completions API."""
