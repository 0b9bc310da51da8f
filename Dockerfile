# chatgate: one image for the service and its simulator.
FROM python:3.11-slim

WORKDIR /app
# The client package (generated stubs) first: it changes less often than the server.
COPY clients/python /app/clients/python
RUN pip install --no-cache-dir /app/clients/python
COPY pyproject.toml README.md /app/
COPY service /app/service
RUN pip install --no-cache-dir /app \
    # Warm tiktoken's cache at build time so token estimates never need the network.
    && python -c "from chatgate_server.usage.tokens import warm_up; warm_up(('o200k_base', 'cl100k_base'))"

ENV TIKTOKEN_CACHE_DIR=/tmp/data-gym-cache
EXPOSE 50051
USER nobody
ENTRYPOINT ["chatgate"]
CMD ["serve"]
