#!/bin/sh
# Re-signs every example agreement in policies/ with the certs-dev key of each of its parties.
# Run it from anywhere after editing an example: a signature covers the file's exact bytes, so
# any edit (even a comment) invalidates the old signatures. DEVELOPMENT KEYS ONLY: real parties
# sign with their own site key, each at its own site (`pacs-broker dsa sign`).
#   PACS_BROKER=path/to/pacs-broker policies/sign-examples.sh
set -eu
cd "$(dirname "$0")/.."
BIN=${PACS_BROKER:-target/debug/pacs-broker}
[ -x "$BIN" ] || cargo build --quiet
for f in policies/example-*.toml; do
    rm -rf "$f.sig"
    for site in $(sed -n 's/^site = "\(.*\)"$/\1/p' "$f"); do
        "$BIN" dsa sign --site-cert "certs-dev/$site.pem" --site-key "certs-dev/$site.key" "$f"
    done
    "$BIN" dsa verify --ca certs-dev/ca.pem "$f" >/dev/null
done
