# One image with the three stages, the chat tool and the example handler.
#   docker build -t swallow:0.1.0 .
# deploy/image-check.sh builds it with buildah (no Docker engine needed) and
# checks its contents and runs the seed's message through it.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Only what the image runs: the stages and swallow-tools (not the test
# harness). The crate registry and the target directory are build caches
# (BuildKit, buildah), so a rebuild compiles only what changed. The `dist`
# profile (Cargo.toml), what the benchmarks measure, optimises the whole
# program (fat LTO, one codegen unit); the image drops its line tables
# (profile.dist.debug) and its symbol tables: it stays small (a panic
# still prints its message and source location, and still unwinds: a
# stage hands a panicking task's delivery back).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_DIST_DEBUG=0 \
    cargo build --profile dist --locked --bins \
      -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools \
 && mkdir /out \
 && cp target/dist/swallow-matcher target/dist/swallow-deliverer target/dist/swallow-responder \
       target/dist/swallow-chat target/dist/swallow-googlebot /out/ \
 && strip --strip-all /out/*

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER nonroot:nonroot
EXPOSE 9101 9102 9103
CMD ["swallow-matcher", "--help"]
