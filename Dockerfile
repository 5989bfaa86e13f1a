# mqttd, an MQTT broker (MQTT 3.1.1, 3.1 and 5.0). Build and run (README.md, "Deploying"):
#   docker build -t mqttd .
#   docker run --rm -it -v mqttd-data:/data mqttd passwd -c /data/passwd alice
#   docker run -d --name mqttd -p 1883:1883 -v mqttd-data:/data mqttd
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 1883 mqttd \
    && useradd --system --uid 1883 --gid mqttd --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin mqttd \
    && install -d -o mqttd -g mqttd -m 0750 /data

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY mqttd ./mqttd
COPY persistence ./persistence
COPY devices ./devices
# the compiled build (docs/COMPILED.md): a C compiler for the install only
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install . \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* /src
COPY deploy/docker.yaml /etc/mqttd/mqttd.yaml

USER mqttd
WORKDIR /data
VOLUME ["/data"]
# 1883: MQTT. 18083: the operations listener (dashboard, metrics), on the container's
# loopback with deploy/docker.yaml; published only with a config that sets http.host and
# http.token.
EXPOSE 1883 18083

# /healthz on the container's loopback (the operations listener of deploy/docker.yaml)
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:18083/healthz', timeout=4)"]

# SIGTERM (docker stop) shuts down in order; give it time: docker stop -t 45
STOPSIGNAL SIGTERM
ENTRYPOINT ["mqttd"]
CMD ["serve", "-c", "/etc/mqttd/mqttd.yaml"]
