# rekey's image: built with the same command CI runs (.ci/run extracts the RUN line below and runs it),
# run as a non-root user on a distroless base.
#   docker build -t registry.example.com/rekey:0.1.0 .
#
# Base images:
# - build: the official Rust image at the toolchain the crate declares (rust-version = 1.95), Debian
#   bookworm, so the binary links against the same glibc the runtime image has.
# - runtime: distroless "cc" (glibc, libgcc, CA certificates; no shell, no package manager), its
#   :nonroot tag runs as uid 65532. The binary is dynamically linked to glibc only (aws-lc for TLS is
#   compiled in), which is why the "static" variant is not enough.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The commit `rekey version` prints: the build context has no .git (.dockerignore), so build.rs
# says "unknown" unless given it: docker build --build-arg REKEY_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG REKEY_GIT_COMMIT=""
RUN cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/rekey /usr/local/bin/rekey
COPY --from=build /src/crds /crds
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/rekey"]
CMD ["run"]
