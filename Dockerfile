# Moorage: a pull-through cache for container registries.
#
#   docker build -t moorage .
#   docker run -p 5000:5000 -v moorage-data:/var/lib/moorage moorage
#
# BASE_IMAGE must provide python3 (>= 3.11) with venv; any Debian-based image does.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
RUN python3 -m venv /opt/moorage
COPY pyproject.toml README.md /src/
COPY proxy /src/proxy
COPY cache /src/cache
COPY upstreams /src/upstreams
COPY config /src/config
# The bytecode pip compiles as it installs stays: the root filesystem is read-only where the
# chart runs it, so without it every start and every HEALTHCHECK would compile the whole
# program again. pip and setuptools are not needed to run it.
RUN /opt/moorage/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/moorage/bin/pip uninstall --yes --quiet --disable-pip-version-check pip setuptools

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="moorage" \
      org.opencontainers.image.description="A pull-through cache for container registries" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md"
COPY --from=builder /opt/moorage /opt/moorage
# The container's default settings; every key can be overridden with MOORAGE_* variables
# or replaced by mounting another file at /etc/moorage/config.yaml.
RUN mkdir -p /etc/moorage \
 && printf '%s\n' \
      'listen: ":5000"' \
      'storage:' \
      '  path: /var/lib/moorage' \
      'log_format: json' \
    > /etc/moorage/config.yaml
# The official python images ship the standard library without its bytecode; compiled once
# here, a read-only root does not compile it at every start and every HEALTHCHECK (half a
# second more each). Files that do not compile (tests with bad syntax on purpose) stay as
# they are.
RUN python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
      > /dev/null || true
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/moorage --no-create-home moorage \
 && mkdir -p /var/lib/moorage \
 && chown 10001:10001 /var/lib/moorage
ENV PATH=/opt/moorage/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MOORAGE_CONFIG=/etc/moorage/config.yaml
USER 10001:10001
WORKDIR /var/lib/moorage
VOLUME ["/var/lib/moorage"]
EXPOSE 5000
# SIGTERM: /readyz fails for shutdown_delay, then stop accepting, let requests finish
# (shutdown_timeout), cancel fills and remove their temporaries. Give the container at least
# shutdown_delay + shutdown_timeout + a few seconds to stop (docker run --stop-timeout 40).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["moorage", "healthcheck"]
ENTRYPOINT ["moorage"]
CMD ["serve"]
