# The event collector alone (POST /events, GET /healthz): the log shipper's endpoint.
# Build from the repository root:  docker build -f docker/collector.Dockerfile -t recsys-collector .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RECSYS_HOME=/var/lib/recsys

WORKDIR /app
# The complete set (recsys[pipeline]: base + pipeline extra) at the versions CI tested
# (hash-checked, no test tools), then the project.
COPY requirements-runtime.lock ./
RUN pip install --require-hashes -r requirements-runtime.lock
COPY pyproject.toml README.md dagster.yaml workspace.yaml ./
COPY recsys_serving ./recsys_serving
COPY recsys_assets ./recsys_assets
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/recsys --create-home recsys

USER recsys
EXPOSE 8000
# Point RECSYS_LAKE_URI at s3://bucket/prefix in production; the default is a local volume.
VOLUME ["/var/lib/recsys"]
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
CMD ["recsys", "collector", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
