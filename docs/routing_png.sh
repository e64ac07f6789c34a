#!/usr/bin/env bash
# The README's routing picture from a real run: headless Chromium draws routing.html and saves the top of
# the page as a PNG.   bash docs/routing_png.sh [out/cpu/seed_0/routing.html] [docs/routing.png]
set -euo pipefail
page=${1:-out/cpu/seed_0/routing.html}
png=${2:-docs/routing.png}
[ -f "$page" ] || { echo "error: $page not found (run bash run.sh first)" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "error: chromium not found (Debian: apt-get install -y chromium)" >&2; exit 2; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,1500 \
  --screenshot="$(realpath -m "$png")" "file://$(realpath "$page")" 2>/dev/null
echo "wrote $png from $page"
