# Builds the pacs-broker binary and a small runtime image. Used by docker-compose.yml.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/pacs-broker pacs-broker
COPY --from=build /src/target/release/pacs-broker /usr/local/bin/pacs-broker
USER pacs-broker
ENTRYPOINT ["/usr/local/bin/pacs-broker"]
