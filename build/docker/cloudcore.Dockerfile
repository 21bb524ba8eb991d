# cloudcore image: built from source, run as non-root on a distroless base.
#   docker build -f build/docker/cloudcore.Dockerfile -t kedge/cloudcore:0.1.0 .
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# The dist profile: fat LTO, size-optimised (see Cargo.toml).
RUN cargo build --locked --profile dist -p cloudcore \
 && install -D -m 0755 target/dist/cloudcore /out/cloudcore

# glibc + CA certificates, nothing else; uid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/cloudcore /usr/local/bin/cloudcore
USER 65532:65532
EXPOSE 10000 10002 10350 10351
ENTRYPOINT ["/usr/local/bin/cloudcore"]
CMD ["--config", "/etc/kedge/cloudcore.yaml"]
