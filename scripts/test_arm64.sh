#!/usr/bin/env bash
# The engine on aarch64 (NEON kernels) under qemu-user emulation, on an x86 Debian/Ubuntu host:
#
#   scripts/test_arm64.sh            # as root (apt, binfmt_misc); reuses what exists
#
# 1. host packages: qemu-user-static binfmt-support mmdebstrap gcc/g++-aarch64-linux-gnu;
# 2. binfmt_misc mounted and qemu-aarch64 enabled, so arm64 binaries run;
# 3. an arm64 Debian root (mmdebstrap, ~2 min) with python3, numpy and, from PyPI inside it,
#    gguf, psutil and pytest (the host's CA bundle and resolv.conf copied in);
# 4. llama.cpp's libraries cross-compiled for aarch64 (scripts/build_backend.sh cpu --arch
#    aarch64: armv8.2-a+dotprod NEON kernels);
# 5. pytest -m arm64 on the host: tiny shard sets and the x86 reference are made here, the
#    engine then runs under the arm64 Python (qemu-aarch64 with QEMU_LD_PREFIX=root, so the
#    repository and the shard sets are reached at their host paths) and the results are judged.
# Prints how long each part took. Timings under emulation are not speeds.
#
# EDGEMOE_ARM64_ROOT (default ~/.cache/edgemoe/arm64-root), EDGEMOE_BACKENDS as in
# build_backend.sh. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ARM_ROOT="${EDGEMOE_ARM64_ROOT:-$HOME/.cache/edgemoe/arm64-root}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
START=$SECONDS
say() { echo "test_arm64: $* [$((SECONDS - START)) s]" >&2; }
die() { echo "test_arm64: error: $*" >&2; exit 1; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# 1. host packages
NEED=()
command -v qemu-aarch64-static >/dev/null || NEED+=(qemu-user-static)
command -v update-binfmts >/dev/null || NEED+=(binfmt-support)
command -v mmdebstrap >/dev/null || NEED+=(mmdebstrap)
command -v aarch64-linux-gnu-g++ >/dev/null || NEED+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
if [ ${#NEED[@]} -gt 0 ]; then
    say "installing ${NEED[*]}"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${NEED[@]}"
fi

# 2. binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || $SUDO update-binfmts --enable qemu-aarch64
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || $SUDO update-binfmts --enable qemu-aarch64

# 3. the arm64 root
if [ ! -x "$ARM_ROOT/usr/bin/python3" ]; then
    say "creating the arm64 root $ARM_ROOT (mmdebstrap)"
    mkdir -p "$(dirname "$ARM_ROOT")"
    $SUDO mmdebstrap --arch=arm64 --variant=apt \
        --include=python3,python3-venv,python3-pip,python3-numpy,ca-certificates,libgomp1 \
        bookworm "$ARM_ROOT" >&2
fi
cp /etc/ssl/certs/ca-certificates.crt "$ARM_ROOT/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$ARM_ROOT/etc/resolv.conf" 2>/dev/null || true
MULTIARCH="$ARM_ROOT/usr/lib/aarch64-linux-gnu"
arm_python() {
    QEMU_LD_PREFIX="$ARM_ROOT" LD_LIBRARY_PATH="$MULTIARCH/blas:$MULTIARCH/lapack" \
        "$ARM_ROOT/usr/bin/python3" "$@"
}
if ! arm_python -c "import gguf, psutil" 2>/dev/null; then
    say "pip install gguf psutil into the arm64 root (under emulation: minutes)"
    GGUF="$(sed -n 's/.*"gguf==\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml")"
    arm_python -m pip install --break-system-packages -q "gguf==$GGUF" psutil >&2
fi
say "arm64 root ready: $(arm_python -c 'import platform, numpy; print(platform.machine(), "numpy", numpy.__version__)')"

# 4. cross-built libraries
LIBLINE="$("$ROOT/scripts/build_backend.sh" cpu --arch aarch64 | tail -1)"
LIB="${LIBLINE#export EDGEMOE_LIB_DIR=}"
say "aarch64 libraries in $LIB"

# 5. the tests
say "pytest -m arm64"
T=$SECONDS
EDGEMOE_ARM64_ROOT="$ARM_ROOT" EDGEMOE_ARM64_LIB="$LIB" \
    "$PYTHON" -m pytest -m arm64 -s -q "$ROOT/tests/test_arm64.py" "$@"
say "tests took $((SECONDS - T)) s (emulated; not a speed); all in all"
