#!/usr/bin/env bash
# ISLP's `Caravan` table (5,822 customers, 85 socio-demographic and product columns, Purchase Yes/No
# at 6%). Prints the CSV's path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/../islp.sh" "$here" Caravan e89d49b6fb8fe02d76bb5bb80d8e0dab473bf9f6a72515e30c259f6d7da42269
