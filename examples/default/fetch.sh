#!/usr/bin/env bash
# ISLP's `Default` table (10,000 rows: default Yes/No, student, balance, income). Prints the CSV's path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/../islp.sh" "$here" Default d113590204485565bdd692b2d8430e7c2fcc72ec323df92314a745c99a0eefe9
