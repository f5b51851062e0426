FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install --no-cache-dir '.[postgres,api]'
USER nobody
ENTRYPOINT []
CMD ["notice-relay", "worker"]
