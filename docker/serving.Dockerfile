# The recommendation service: /recommendations, /similar, /events, /admin, /healthz,
# /readyz, /metrics. Build from the repository root:
#   docker build -f docker/serving.Dockerfile -t recsys-serving .
#
# No model is baked in: at start every worker reads the registry's `production` and
# `candidate` aliases in RECSYS_LAKE_URI (s3://... in production), fetches and verifies
# the bundles into the cache under RECSYS_HOME, and keeps following the aliases (hot
# swap, phase-in, rollback) without a restart. RECSYS_MODEL_URI=oci://host/repo@sha256:...
# pins one promoted artifact instead. /readyz stays 503 until a model is loaded.
# API keys come from RECSYS_API_KEYS ({"<key>": ["recommend", "events"]}) or from
# `recsys keys create` (a full install, e.g. the recsys-dagster image) against the
# volume's key file: this image has `recsys-serve` only.
#
# The serving set only (recsys[serving], the base dependencies): requirements-serving.lock
# pins (with hashes) what recsys_serving imports, the same versions CI tested, and
# nothing of the training stack (no Dagster, great-expectations or implicit). The package
# goes on top with --no-deps; its entry point `recsys-serve` imports nothing from
# recsys_assets (import-linter checks that in `make lint`), so the image runs without
# the pipeline's libraries.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OPENBLAS_NUM_THREADS=1 \
    RECSYS_HOME=/var/lib/recsys

# LightGBM's wheels link against the system OpenMP runtime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements-serving.lock ./
RUN pip install --require-hashes -r requirements-serving.lock
COPY pyproject.toml README.md ./
COPY recsys_serving ./recsys_serving
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/recsys --create-home recsys

USER recsys
EXPOSE 8000
VOLUME ["/var/lib/recsys"]
# Liveness only: a worker without a model is alive (and says so on /readyz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
# One worker per core of the container; token buckets and metrics are shared by them.
CMD ["recsys-serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
