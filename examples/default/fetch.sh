#!/usr/bin/env bash
# ISLP's `Default` table (10,000 rows: default Yes/No, student, balance, income), taken from the ISLP
# wheel on PyPI without its dependencies. Prints the CSV's path; quick when already fetched.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
csv="$here/data/Default.csv"
sha="d113590204485565bdd692b2d8430e7c2fcc72ec323df92314a745c99a0eefe9"
if [ ! -f "$csv" ]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --dest "$tmp" ISLP==0.6.0 >&2
  mkdir -p "$here/data"
  "${PYTHON:-python3}" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("ISLP/data/Default.csv"))' "$tmp"/[Ii][Ss][Ll][Pp]-0.6.0-*.whl "$csv"
fi
echo "$sha  $csv" | sha256sum --check --quiet - >&2 || { echo "fetch.sh: $csv is not the expected file" >&2; exit 1; }
echo "$csv"
