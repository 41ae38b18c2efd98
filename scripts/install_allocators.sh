#!/usr/bin/env bash
# jemalloc and tcmalloc, the C allocators a tier may ask for (TierConfig.allocator; the default,
# auto, runs tcmalloc where installed and glibc's otherwise): Debian/Ubuntu's libjemalloc2 and
# libtcmalloc-minimal4, installed where this user may (root, or sudo without a password).
# `make install` runs it (so CI's tests preloading them run); where it cannot install, it says what
# is missing. Never fails: the tiers then run on glibc's, those tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."

# The packages and the check the tiers use (serving/heap.py needs only the standard library, so it
# runs before the package is installed).
missing() {
  python3 - <<'PY'
import runpy
heap = runpy.run_path("services/speccascade/serving/heap.py")
print(" ".join(package for name, package in heap["ALLOCATOR_PACKAGES"].items() if not heap["allocator_installed"](name)))
PY
}

packages=$(missing)
[ -z "$packages" ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(none); fi
  if [ "${sudo[0]:-}" != none ]; then
    echo "installing $packages (C allocators a tier may ask for)"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    "${sudo[@]}" apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1 \
      || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 \
           && "${sudo[@]}" apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1; }
  fi
fi
packages=$(missing)
[ -n "$packages" ] && echo "not installed: $packages; tiers with allocator auto run on glibc's (slower CPU" \
                          "passes), a tier asking for a missing one by name will not start" >&2
exit 0
