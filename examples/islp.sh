#!/usr/bin/env bash
# A table of the ISLP wheel on PyPI (ISLP 0.6.0, taken without its dependencies) into an example's
# data/ folder, checked against its sha256: islp.sh EXAMPLE_DIR TABLE SHA256. Prints the CSV's path;
# quick when already fetched.
set -euo pipefail
dir="$1"; table="$2"; sha="$3"
csv="$dir/data/$table.csv"
if [ ! -f "$csv" ]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --dest "$tmp" ISLP==0.6.0 >&2
  mkdir -p "$dir/data"
  "${PYTHON:-python3}" -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(f"ISLP/data/{sys.argv[2]}.csv"))' "$tmp"/[Ii][Ss][Ll][Pp]-0.6.0-*.whl "$table" "$csv"
fi
echo "$sha  $csv" | sha256sum --check --quiet - >&2 || { echo "islp.sh: $csv is not the expected file" >&2; exit 1; }
echo "$csv"
