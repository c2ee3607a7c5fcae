# A pacsmesh node image: the package from this tree, nothing else.
FROM python:3.11-slim
WORKDIR /opt/pacsmesh
COPY pyproject.toml README.md ./
COPY node node
COPY cluster cluster
COPY proto proto
COPY pacsmesh pacsmesh
RUN pip install --no-cache-dir . && useradd --system pacsmesh && mkdir /data && chown pacsmesh /data
USER pacsmesh
EXPOSE 7400 11112
ENTRYPOINT ["pacsmesh"]
CMD ["node", "--config", "/etc/pacsmesh/node.toml"]
