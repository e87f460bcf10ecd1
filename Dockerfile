# fedkeys coordinator (and simulated devices): CPU-only image.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install executorch==1.5.1
COPY pyproject.toml README.md ./
COPY fedkeys fedkeys
COPY protocol protocol
COPY coordinator coordinator
COPY edge_client edge_client
COPY model_export model_export
COPY simulator simulator
RUN pip install ".[coordinator,export,sim]"

RUN useradd --create-home fedkeys && mkdir -p /data && chown fedkeys /data
USER fedkeys
ENV FEDKEYS_DATA_DIR=/data
EXPOSE 8443
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import httpx,sys; sys.exit(httpx.get('https://localhost:8443/healthz', verify=False).status_code != 200)"
CMD ["fedkeys", "coordinator", "serve", "--host", "0.0.0.0", "--port", "8443", "--tls-dir", "/data/tls", "--workers", "2"]
