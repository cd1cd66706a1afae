# One image with the three stages, the chat tool and the example handler.
# docker build -t swallow .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
      -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools \
 && mkdir /out \
 && cp target/release/swallow-matcher target/release/swallow-deliverer target/release/swallow-responder \
       target/release/swallow-chat target/release/swallow-googlebot /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER nonroot:nonroot
EXPOSE 9101 9102 9103
CMD ["swallow-matcher", "--help"]
