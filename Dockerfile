# auto-com-center: one image for every role (ingress, registry). The default command runs all of
# them in one process; docker-compose.yml runs one role per container against a separate NATS
# server. There is no nats-server in this image, so `serve` needs NATS_URL.

# ---- build -------------------------------------------------------------------------------------
# Every file cargo reads is named by a COPY below: the manifests of both workspace members
# (Cargo.toml names `load-tests/loadgen`), the lock file and each member's sources. The build stage
# is checked without Docker by scripts/check-docker-build, which copies exactly these COPY sources
# into an empty directory and runs these RUN lines there; keep every RUN free of absolute paths.
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, against placeholder sources, so that editing src/ does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY load-tests/loadgen/Cargo.toml ./load-tests/loadgen/
RUN mkdir -p src tests/api load-tests/loadgen/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > load-tests/loadgen/src/main.rs \
 && touch src/lib.rs tests/api/main.rs \
 && cargo build --release --locked \
 && rm -rf src tests load-tests/loadgen/src \
      target/release/auto-com-center* \
      target/release/deps/auto_com_center-* \
      target/release/deps/libauto_com_center-* \
      target/release/.fingerprint/auto-com-center-*

COPY src ./src
# The request-body schemas (src/bodies.rs) are built from the stored messages' schemas.
COPY subjects ./subjects
COPY tests ./tests
COPY load-tests/loadgen/src ./load-tests/loadgen/src
RUN cargo build --release --locked \
 && install -D -m 0755 target/release/auto-com-center out/auto-com-center

# ---- runtime -----------------------------------------------------------------------------------
FROM debian:bookworm-slim

# CA certificates for TLS to NATS (tls://) and to the OTLP endpoint.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Never run as root. /data is the default DATA_DIR, owned by the service user.
RUN groupadd --system --gid 10001 acc \
 && useradd --system --uid 10001 --gid acc --home-dir /data --shell /usr/sbin/nologin acc \
 && install -d -o acc -g acc -m 0750 /data

COPY --from=build /src/out/auto-com-center /usr/local/bin/auto-com-center

USER acc:acc
WORKDIR /data

# Inside a container the listener must not be limited to loopback.
ENV HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080

ENTRYPOINT ["auto-com-center"]
CMD ["serve"]
