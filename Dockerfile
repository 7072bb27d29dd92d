# Multi-stage build of the modelcache binaries (cache-node, cache-agent, modelcache-sample).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p cache-node -p cache-agent -p modelcache-bench

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cache-node /src/target/release/cache-agent \
     /src/target/release/modelcache-sample /usr/local/bin/
EXPOSE 7070
CMD ["cache-node"]
