# The sidecar image: the repository installed into a virtualenv at /opt/venv, run as a non-root
# user, `sidecar` as the entrypoint and `run` as the default command (config from
# $SIDECAR_CONFIG, /etc/sidecar/sidecar.yaml). The demo apps use the same image with
# `--entrypoint python3 ... -m sidecar.demo_app`, and transparent mode's init containers run
# `sidecar iptables install` from it, so one build serves the whole mesh.
#
#   docker build -t sidecar:dev .
#   docker build --build-arg BASE_IMAGE=localhost/sidecar-base:bookworm -t sidecar:dev .
#
# BASE_IMAGE is any Debian-like image with `python3` (3.11+) and its venv module. Both stages
# start from it, so the virtualenv's interpreter path is the same in the final image. Nothing is
# compiled here (every dependency ships wheels); should a platform lack one, install the
# compiler in the build stage only, never in the final one.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# Debian's system Python refuses system-wide pip installs (PEP 668): install into a venv.
RUN python3 -m venv /opt/venv
COPY . /src
RUN /opt/venv/bin/pip install --no-warn-script-location /src \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && /opt/venv/bin/sidecar --help > /dev/null

FROM ${BASE_IMAGE}
# iptables, for `sidecar iptables install` (transparent mode's init container runs this image as
# root with NET_ADMIN). A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it without a
# name lookup.
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin sidecar \
 && mkdir -p /etc/sidecar
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml
USER 10001:10001
WORKDIR /etc/sidecar
# 8443: the usual inbound (mTLS) listener; 9901: the admin server (/healthz, /readyz, /metrics).
EXPOSE 8443 9901
# Ready means every listener bound and the identity cert loaded and valid (admin `/readyz`).
# Set SIDECAR_HEALTHCHECK_URL when the config's admin.listen is elsewhere.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen(os.environ.get('SIDECAR_HEALTHCHECK_URL', 'http://127.0.0.1:9901/readyz'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
CMD ["run"]
