# edgelb: the proxy as a container. Build: docker build -t edgelb .
# Run with a config mounted at /etc/edgelb/edgelb.yaml (its admin listener on port 9090, which
# the HEALTHCHECK below probes), e.g.
#   docker run -v "$PWD/examples/http-static.yaml:/etc/edgelb/edgelb.yaml:ro" -p 10000:10000 edgelb
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 edgelb \
    && useradd --system --uid 10001 --gid edgelb --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin edgelb \
    && mkdir -p /etc/edgelb

# .dockerignore keeps the build context to the packaging inputs; a regular (not editable)
# install, so the wheel itself must carry edgelb, watchers, balancers and templates. The build
# compiles the data path with mypyc (setup.py; EDGELB_COMPILE=1: compiled or the build fails),
# so a C compiler is installed for that step and removed in the same layer; the latest Debian
# security fixes are wanted, hence unpinned.
WORKDIR /usr/src/edgelb
COPY . .
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && EDGELB_COMPILE=1 pip install --no-cache-dir . \
    && python -I -c "from edgelb.compiled import describe; print('edgelb:', describe())" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* /usr/src/edgelb

WORKDIR /
USER 10001:10001

EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["edgelb"]
CMD ["run", "-c", "/etc/edgelb/edgelb.yaml"]
