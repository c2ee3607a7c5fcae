# A pacsmesh node image, in two stages: the first builds a wheel from this tree, the
# second installs that wheel (not the source tree, not editable) into a slim runtime,
# so the image runs exactly what `pip install pacsmesh-*.whl` gives any other host.
# tests/test_wheel.py builds the wheel from the same COPY lines and runs a node from it.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node node
COPY cluster cluster
COPY proto proto
COPY pacsmesh pacsmesh
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/pacsmesh-*.whl && rm -rf /tmp/wheels \
    && groupadd --system --gid 10001 pacsmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home pacsmesh \
    && mkdir /data && chown 10001:10001 /data
# Numeric, so an orchestrator's "run as non-root" can verify it without /etc/passwd.
USER 10001:10001
# gRPC (peers and the CLI) and DICOM
EXPOSE 7400 11112
# The gRPC health service, asked by the installed CLI (exit 0 only when SERVING).
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
    CMD ["pacsmesh", "health", "--node", "127.0.0.1:7400", "--timeout", "5"]
ENTRYPOINT ["pacsmesh"]
CMD ["node", "--config", "/etc/pacsmesh/node.toml"]
