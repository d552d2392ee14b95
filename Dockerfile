# syntax=docker/dockerfile:1
#
# caddy-waproxy: Caddy + caddy-l4 + this plugin, built with xcaddy exactly as
# `just build` does (versions from xcaddy.json, through ./internal/buildrecipe),
# into a static binary on a distroless, non-root runtime image.
#
#   docker build -t caddy-waproxy .
#   docker run --rm -p 443:443 -p 5222:5222 -p 587:587 caddy-waproxy
#
# The default config is deploy/kubernetes/Caddyfile: the official WhatsApp
# proxy's ports (80 443 5222 587 7777; 8080 8443 8222 expect a PROXY header)
# and 8199 for GET /metrics and GET /healthz. Mount your own over
# /etc/caddy/Caddyfile. See docs/deploy.md.

# The Go release of go.mod's `go` line.
ARG GO_VERSION=1.26

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
ENV CGO_ENABLED=0
# Modules first, so a source change doesn't download them again.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
# The Justfile's `build` recipe: go tool xcaddy $(go run ./internal/buildrecipe)
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    go tool xcaddy $(go run ./internal/buildrecipe) \
    && mv "$(go run ./internal/buildrecipe -output)" /usr/local/bin/caddy \
    && /usr/local/bin/caddy version \
    && /usr/local/bin/caddy list-modules | grep -qx layer4.handlers.wa_proxy \
    && /usr/local/bin/caddy validate --config deploy/kubernetes/Caddyfile --adapter caddyfile \
    && mkdir -p /out/data /out/config

# Static binary: no libc needed. "nonroot" is uid/gid 65532; the image has CA
# certificates (for ACME and upstream TLS) and tzdata.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /usr/local/bin/caddy /usr/bin/caddy
COPY deploy/kubernetes/Caddyfile /etc/caddy/Caddyfile
# Caddy's data (certificates, its local CA) and config (autosave) directories;
# mount volumes here to keep them, and on a read-only root filesystem.
ENV XDG_DATA_HOME=/data XDG_CONFIG_HOME=/config
COPY --from=build --chown=65532:65532 /out/ /
VOLUME ["/data", "/config"]
USER 65532:65532
WORKDIR /data
# Chat, chat in TLS, media TLS passthrough, HTTP proxy: every port detects every
# protocol. 8080 8443 8222 expect a PROXY header. 8199: /metrics and /healthz.
# Binding 80, 443 and 587 as a non-root user needs no capability: Docker sets
# net.ipv4.ip_unprivileged_port_start=0 in each container (since 20.10), and
# the Kubernetes manifests set the same sysctl.
EXPOSE 80 443 5222 587 7777 8080 8443 8222 8199
ENTRYPOINT ["/usr/bin/caddy"]
CMD ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
