# syntax=docker/dockerfile:1
# mqtt-fs-worker: a slot that stays up (MQTT_RESPAWN=true) and runs each job in a fresh worker process, so Docker's
# restart delays never throttle it; run it with `restart: always` for crashes. tini is PID 1 (no --init needed).
# Limits need a writable cgroupfs:
#   docker run --cgroupns=private --security-opt writable-cgroups=true ...   (Docker Engine >= 28)
#   docker run --privileged ...                                              (older engines)

ARG NODE_VERSION=24

FROM node:${NODE_VERSION}-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY scripts ./scripts
COPY src ./src
RUN npm run build

# The bundle in dist/bundle holds every runtime dependency: the image needs no node_modules.
FROM node:${NODE_VERSION}-bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mqtt-fs-worker" \
      org.opencontainers.image.description="One-shot MQTT job worker: one job per start, cgroup limits, no job lost" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
# tini as PID 1 reaps orphans and forwards signals to the worker. setpriv (util-linux, for --run-as), getent and id
# are in the base image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mqtt-fs-worker
COPY --from=build /src/dist/bundle ./dist/bundle
COPY package.json README.md LICENSE ./
COPY bin ./bin
RUN ln -s /opt/mqtt-fs-worker/bin/mqtt-fs-worker.js /usr/local/bin/mqtt-fs-worker \
 && mkdir -p /jobs /workspaces
ENV MQTT_JOBS_DIR=/jobs \
    MQTT_WORKSPACES_DIR=/workspaces \
    MQTT_RESPAWN=true \
    NODE_ENV=production
VOLUME ["/workspaces"]
ENTRYPOINT ["tini", "--", "mqtt-fs-worker"]
