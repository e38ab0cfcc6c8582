#!/usr/bin/env bash
# Download the peers' wheels that `gpu_check.sh` compares against, for a GPU machine that cannot reach PyPI.
#
#   bash benchmarks/carry_wheels.sh          # on the machine WITH internet, in the repository root
#
# then send `.whl/` along with the checkout (the lent GPU's `carry`); `gpu_check.sh` installs whatever it finds
# there into a private folder before anything else and puts it on PYTHONPATH. `.whl/` is added to
# `.git/info/exclude`, so the wheels are never committed.
#
# Only pure-Python wheels are pinned here (a few hundred KB): liger-kernel and cut-cross-entropy need nothing
# beyond torch and triton, which the GPU image has. Pins are the versions whose call signatures
# `benchmarks/bench_logit_capture_speed.py` was checked against (liger-kernel's fused linear cross-entropy
# also ran there under TRITON_INTERPRET=1 and matched F.cross_entropy's loss and gradients).
# Override with PEER_WHEELS="name==version ...".
set -euo pipefail
cd "$(dirname "$0")/.."

PEER_WHEELS=${PEER_WHEELS:-"liger-kernel==0.8.5 cut-cross-entropy==25.1.1"}
PY=${PYTHON:-python3}
DEST=.whl

mkdir -p "$DEST"
if [ -d .git ]; then
  mkdir -p .git/info
  grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
fi

# The GPU image's Python is 3.12 on x86-64 (device README); pure-Python wheels match any platform, but the
# flags keep a future binary pin from silently fetching a wheel for this machine instead.
for spec in $PEER_WHEELS; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" "$spec"
done

# One version per package: two would make the install on the GPU machine refuse both.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one wheel of: $dupes (remove the old ones from $DEST/)" >&2
  exit 1
fi
ls -l "$DEST"
echo "carry '$DEST' with the GPU run; gpu_check.sh installs these first ($(du -sh "$DEST" | cut -f1) in all)"
