#!/usr/bin/env bash
# Cuts a GGUF into pieces that one device call each can carry (59 MiB: the call's 64 MiB less the working tree),
# into .gm/p0 ... .gm/pN here (git-ignored), with its sha256 in the last; tools/gpu/speculative-runs.sh joins them.
#   tools/gpu/split-model.sh [MODEL]     (default: the bundled Gemma-3-270M)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
M=${1:-$("$PY" -c 'from dualblade.models import bundled_model_path; print(bundled_model_path())')}
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF /.gm/ "$exclude" 2>/dev/null || echo /.gm/ >>"$exclude"
rm -rf .gm && mkdir -p .gm
split -b $((59 << 20)) -d -a 1 "$M" .gm/g.
n=0
for f in .gm/g.*; do mkdir -p .gm/p$n && mv "$f" .gm/p$n/; n=$((n + 1)); done
sha256sum "$M" | cut -c1-64 >.gm/p$((n - 1))/sha256
du -sh .gm/p*
