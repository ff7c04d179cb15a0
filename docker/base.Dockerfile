# Local stand-in for python:3.11-slim-bookworm, for machines without Docker Hub
# (scripts/test-compose builds it; users with Docker Hub never need it). The root filesystem is
# `debootstrap --variant=minbase bookworm` with Debian's python3, venv, pip and headers, made by
# the script and imported as ROOTFS. Build context: a directory holding ca/*.crt, the host's
# local CA certificates (a TLS-intercepting proxy's), so that pip in the project build trusts
# the proxy as the host does.
ARG ROOTFS=est-agent-base/rootfs:bookworm
FROM ${ROOTFS}

COPY ca/ /usr/local/share/ca-certificates/
# The official image has `python` and `pip` first on PATH, installing system-wide; Debian's pip
# refuses that (PEP 668, externally managed), so a venv plays the part of /usr/local.
RUN update-ca-certificates \
 && python3 -m venv /opt/python \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
CMD ["python3"]
