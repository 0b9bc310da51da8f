# chatgate: one image for the service and its simulator.
# Third-party packages come from requirements.lock only (exact versions, checked by
# hash), so two builds of one commit install the same code; scripts/lock renews it.
FROM python:3.11-slim
# Tagged chatgate:<version> by docker-compose.yml and named so by deploy/kubernetes;
# tests/unit/test_kubernetes_coherence.py keeps the three and pyproject.toml in step.
LABEL org.opencontainers.image.title="chatgate" \
      org.opencontainers.image.version="0.1.0"

WORKDIR /app
COPY requirements.lock /app/
RUN pip install --no-cache-dir --require-hashes -r /app/requirements.lock
# Our two packages: their dependencies are all in the lock, so nothing else is fetched
# (--no-deps) and they build with the locked setuptools (--no-build-isolation).
COPY clients/python /app/clients/python
COPY pyproject.toml README.md /app/
COPY service /app/service
ENV TIKTOKEN_CACHE_DIR=/opt/chatgate/tiktoken-cache
RUN pip install --no-cache-dir --no-deps --no-build-isolation --no-index /app/clients/python /app \
    # Warm tiktoken's cache at build time so token estimates never need the network.
    && python -c "from chatgate_server.usage.tokens import warm_up; warm_up(('o200k_base', 'cl100k_base'))"

# The service runs as nobody (uid 65534, gid 65534 for nogroup: the manifests' runAsUser
# and runAsGroup) in a root-owned /app: what it writes (the usage spool)
# goes to a data directory of its own, which docker-compose.yml puts on a volume.
RUN mkdir -p /var/lib/chatgate/spool && chown -R nobody:nogroup /var/lib/chatgate
ENV CHATGATE_SPOOL_DIR=/var/lib/chatgate/spool
EXPOSE 50051
USER nobody
# Unhealthy while draining, while calls are refused for a full ledger, and while usage
# rows wait in the spool because Postgres is away (they are safe, but not yet billed).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["chatgate", "health", "--ledger"]
ENTRYPOINT ["chatgate"]
CMD ["serve"]
