FROM python:3.11-slim
WORKDIR /app
# jemalloc: the worker's allocator when installed (notice_relay.memory)
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install --no-cache-dir '.[postgres,api]'
USER nobody
ENTRYPOINT []
CMD ["notice-relay", "worker"]
