"""Azure OpenAI: the OpenAI wire, another URL and another auth header.

Two URL forms, both with the key in an ``api-key`` header:

- deployments (``api_version`` a date such as ``2024-10-21``):
  ``{resource}/openai/deployments/{deployment}/chat/completions?api-version=…`` — the
  model name a deployment is asked for is the Azure deployment's name;
- v1 (``api_version = "v1"``): ``{resource}/openai/v1/chat/completions`` with the
  model in the body, as on OpenAI.

The stream, errors and rate-limit headers are OpenAI's (Azure opens a stream with a
chunk of prompt filter results and no id, which the chunk decoder skips).
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote

import httpcore

from chatgate_server.config import Secret
from chatgate_server.domain import CompletionRequest
from chatgate_server.upstream.openai import OpenAIUpstream

V1 = "v1"
# A deployment serving any model name ("*") must not grow the cache without bound.
_MAX_CACHED_URLS = 256


class AzureOpenAIUpstream(OpenAIUpstream):
    """An Azure OpenAI resource (``https://{name}.openai.azure.com``)."""

    provider = "azure.ai.openai"

    def __init__(
        self,
        resource_url: str,
        api_key: Secret,
        *,
        api_version: str,
        connect_timeout: float = 5.0,
        max_connections: int = 1000,
        coalesce_deltas: bool = True,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(
            resource_url,
            api_key,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            coalesce_deltas=coalesce_deltas,
            extra_headers=extra_headers,
        )
        self.api_version = api_version
        self._v1_url = self._url_for(f"{self._base_path}/openai/v1/chat/completions")
        # One URL per deployment name, made on first use (a handful per resource).
        self._urls: dict[str, httpcore.URL] = {}

    def _auth_headers(self, api_key: Secret | None) -> list[tuple[bytes, bytes]]:
        return [] if api_key is None else [(b"api-key", api_key.value.encode())]

    def _target(self, request: CompletionRequest) -> httpcore.URL:
        if self.api_version == V1:
            return self._v1_url
        url = self._urls.get(request.model)
        if url is None:
            deployment = quote(request.model, safe="")
            version = quote(self.api_version, safe="")
            url = self._url_for(
                f"{self._base_path}/openai/deployments/{deployment}/chat/completions?api-version={version}"
            )
            if len(self._urls) < _MAX_CACHED_URLS:
                self._urls[request.model] = url
        return url
