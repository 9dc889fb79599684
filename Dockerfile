# Multi-stage build of switchboard: compile in the Rust image, run in a slim Debian as a non-root
# user, with a HEALTHCHECK on /readyz. docs/DEPLOY.md, "Docker". (Not built on the development
# machine, which has no Docker engine: see the note there.)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin switchboard \
 && strip target/release/switchboard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin switchboard
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
USER switchboard
ENV SWITCHBOARD_LISTEN=0.0.0.0:8080 \
    SWITCHBOARD_LOG_FORMAT=json
EXPOSE 8080
# /readyz is 503 while starting, while Redis is unreachable and while draining.
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
# Docker sends SIGTERM on stop: the server drains over --drain-period (5s), so stop with
# `docker stop -t 15` or more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchboard"]
