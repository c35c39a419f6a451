# gavel: the server (`gavel`) and its load generator (`gavel-bench`) in one
# slim image. Built by compose.yaml; on its own:
#   docker build -t gavel .
#   docker run -p 8080:8080 gavel            # one node on SQLite in /var/lib/gavel
#
# Stage 1 builds the dependencies from the manifests alone, so that a change
# to gavel's sources reuses that layer; stage 2 builds gavel; stage 3 is the
# runtime: Debian slim, a non-root user, a health check on /ready.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# The dependency layer: the workspace's manifests and empty targets, and
# cargo's configuration (the `tokio_unstable` cfg gavel's runtime needs to keep
# requests in arrival order; see .cargo/config.toml), which every crate is
# built with.
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY .cargo/config.toml .cargo/
COPY actors/Cargo.toml actors/
COPY benches/Cargo.toml benches/
RUN mkdir -p src actors/src benches/src migrations/sqlite migrations/postgres \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs actors/src/lib.rs \
    && echo 'fn main() {}' > benches/src/main.rs \
    && echo 'fn main() {}' > benches/src/baseline.rs \
    && cargo build --release --locked -p gavel -p gavel-bench \
    && rm -rf src actors/src benches/src

# gavel itself. The sources are touched so that cargo rebuilds them over the
# empty targets above whatever their times in the build context.
COPY src src
COPY actors/src actors/src
COPY benches/src benches/src
COPY migrations migrations
RUN touch src/main.rs src/lib.rs actors/src/lib.rs benches/src/main.rs benches/src/baseline.rs \
    && cargo build --release --locked -p gavel -p gavel-bench \
    && cp target/release/gavel target/release/gavel-bench /usr/local/bin/

FROM debian:bookworm-slim
# Kept in step with Cargo.toml's version (tests/api/compose.rs checks it).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="gavel" \
      org.opencontainers.image.description="A real-time auction server: one actor per live auction, group-committed bids." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# curl for the health check. Debian stable's package is not pinned to a
# version: its security updates replace the old one in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/gavel --create-home gavel

COPY --from=build /usr/local/bin/gavel /usr/local/bin/gavel-bench /usr/local/bin/

USER 10001:10001
WORKDIR /var/lib/gavel
ENV GAVEL_LISTEN=0.0.0.0:8080 \
    GAVEL_DATA_DIR=/var/lib/gavel \
    GAVEL_LOG_FORMAT=json
EXPOSE 8080
VOLUME ["/var/lib/gavel"]
# /ready is 200 when the node can serve: its store answers, its commits go
# through, and (in a cluster) its membership is confirmed.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--max-time", "2", "http://127.0.0.1:8080/ready"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gavel"]
