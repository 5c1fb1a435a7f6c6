# Dagster for recsys: the webserver, the daemon and the user-code server from one image;
# the command picks the process (docker/compose.yaml runs all three). Build from the
# repository root:  docker build -f docker/dagster.Dockerfile -t recsys-dagster .
#
# Every process starts through `python -m recsys_assets.instance`, which installs the
# project's dagster.yaml into $DAGSTER_HOME and adds PostgreSQL storage when
# RECSYS_DAGSTER_PG_URL (or DAGSTER_PG_*) is set, then execs the command. Alone,
# `docker run -p 3000:3000 recsys-dagster` serves the UI with the code location loaded
# in-process from the project's workspace.yaml and SQLite storage in the volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GX_ANALYTICS_ENABLED=false \
    RECSYS_HOME=/var/lib/recsys \
    DAGSTER_HOME=/var/lib/recsys/dagster

# LightGBM's wheels link against the system OpenMP runtime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The complete set (recsys[pipeline]: base + pipeline extra) at the versions CI tested
# (hash-checked, no test tools), then the project.
COPY requirements-runtime.lock ./
RUN pip install --require-hashes -r requirements-runtime.lock
COPY pyproject.toml README.md dagster.yaml workspace.yaml ./
COPY recsys_serving ./recsys_serving
COPY recsys_assets ./recsys_assets
COPY docker/dagster ./docker/dagster
# dagster.yaml and workspace.yaml ship in the package (recsys_assets.instance reads them
# from there); the copies at /app serve `--workspace workspace.yaml` below.
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/recsys --create-home recsys \
 && mkdir -p /var/lib/recsys/dagster \
 && chown -R recsys /var/lib/recsys

USER recsys
# 3000: webserver UI and GraphQL; 4000: the code server's gRPC port.
EXPOSE 3000 4000
VOLUME ["/var/lib/recsys"]
# For the webserver; compose gives the daemon and the code server their own checks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/server_info', timeout=4).status == 200 else 1)"
ENTRYPOINT ["python", "-m", "recsys_assets.instance"]
CMD ["dagster-webserver", "--host", "0.0.0.0", "--port", "3000", "--workspace", "workspace.yaml"]
