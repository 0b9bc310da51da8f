"""The OpenAI upstream: request bodies, the HTTP client and sans-IO stream decoding."""
