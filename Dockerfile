# The modelcache image: cache-node, cache-agent, modelcache-quantize and
# modelcache-sample, stripped release builds, run as an unprivileged user; the node
# listens on every interface inside the container (`docker run -p 7070:7070` reaches it).
# BASE is the runtime image (any Debian-like image with CA certificates; scripts/images
# builds the same image from a Debian base made locally, for machines without a registry).
ARG BASE=debian:bookworm-slim

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The product crates only: the sample generator lives in modelcache-quant, no test crate.
RUN cargo build --release --locked --bins -p cache-node -p cache-agent -p modelcache-quant \
    && mkdir /out \
    && for bin in cache-node cache-agent modelcache-quantize modelcache-sample; do \
         objcopy --strip-all "target/release/$bin" "/out/$bin"; \
       done

FROM ${BASE} AS runtime
RUN (command -v update-ca-certificates >/dev/null \
        || (apt-get update && apt-get install -y --no-install-recommends ca-certificates \
            && rm -rf /var/lib/apt/lists/*)) \
    && useradd --system --uid 10001 --home-dir /var/cache/modelcache modelcache \
    && mkdir -p /var/cache/modelcache /models \
    && chown modelcache /var/cache/modelcache /models
COPY --from=build /out/ /usr/local/bin/
USER modelcache
ENV CACHE_NODE_LISTEN=0.0.0.0:7070 \
    CACHE_NODE_CACHE_DIR=/var/cache/modelcache \
    CACHE_AGENT_DIR=/models
EXPOSE 7070
CMD ["cache-node"]
