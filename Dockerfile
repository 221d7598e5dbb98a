# dimstream: the training daemon, the re-pruning job and the tools, on the same pinned stack as `make`.
# CPU by default; `docker build --build-arg STACK=cuda .` takes PyPI's default (CUDA) torch build
# and the CUDA fbgemm-gpu instead of fbgemm-gpu-cpu.
FROM python:3.11-slim

ARG STACK=cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /opt/dimstream
COPY requirements-cpu.txt requirements-torchrec.txt requirements.txt ./
# torch first; fbgemm-gpu(-cpu) and torchrec without their dependencies (pip would otherwise
# resolve the CUDA fbgemm-gpu and the newest torch); then the rest, explicitly listed
RUN if [ "$STACK" = "cuda" ]; then \
      pip install torch==2.13.0 && \
      pip install --no-deps fbgemm-gpu==1.8.0 torchrec==1.8.0; \
    else \
      pip install -r requirements-cpu.txt && \
      pip install --no-deps -r requirements-torchrec.txt; \
    fi && \
    pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY stream stream
COPY models models
COPY search search
COPY ops ops
RUN pip install --no-deps . && \
    useradd --create-home --uid 10001 dimstream && \
    mkdir -p /var/lib/dimstream && chown dimstream /var/lib/dimstream

USER 10001
VOLUME /var/lib/dimstream
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]
ENTRYPOINT ["dimstream"]
CMD ["run", "--state-dir", "/var/lib/dimstream", "--metrics-addr", "0.0.0.0:9100"]
