#!/usr/bin/env bash
# Build the ggml/llama libraries edgemoe runs on, from the llama.cpp that llama-cpp-python (the
# version pinned in edgemoe/_lib.py) vendors, with one or more ggml backends:
#
#   scripts/build_backend.sh vulkan            # Vulkan (Linux/Windows GPUs; Mesa's llvmpipe here)
#   scripts/build_backend.sh rpc               # llama.cpp's RPC client + its ggml-rpc-server
#   scripts/build_backend.sh vulkan rpc        # several backends in one build
#   scripts/build_backend.sh cuda              # NVIDIA (needs the CUDA toolkit's nvcc)
#   scripts/build_backend.sh metal             # Apple GPUs (macOS)
#   scripts/build_backend.sh cpu --arch aarch64   # cross-built for arm64 (NEON kernels)
#
# The libraries land in OUT/lib (rpc: OUT/bin/ggml-rpc-server too); the last line printed is
#   export EDGEMOE_LIB_DIR=OUT/lib
# which makes the engine load them instead of llama-cpp-python's CPU build. `edgemoe devices`
# then lists the new devices and `--device Vulkan0` (or CUDA0, Metal, ...) selects one.
# With --venv DIR the backend is installed into that virtualenv's llama-cpp-python instead
# (pip builds the same patched source with CMAKE_ARGS; no EDGEMOE_LIB_DIR needed afterwards).
#
# Options:
#   --out DIR     where to build (default: $EDGEMOE_BACKENDS/<backends>[-<arch>], EDGEMOE_BACKENDS
#                 defaulting to ~/.cache/edgemoe/backends); an existing build is reused
#   --src DIR     a llama.cpp source tree to build instead of llama-cpp-python's sdist
#   --sdist FILE  llama-cpp-python's sdist (default: pip download of the pinned version)
#   --arch aarch64  cross-compile for arm64 with aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu)
#   --venv DIR    pip-install llama-cpp-python built with these backends into virtualenv DIR
#   --jobs N      parallel compile jobs (default: the number of cores)
#   --dl          GGML_BACKEND_DL: backends as modules loaded at run time (ggml_backend_load_all)
# PYTHON: the interpreter whose pip downloads the sdist (default python3).
#
# Vulkan needs (Debian/Ubuntu) libvulkan-dev glslc spirv-headers, and a driver at run time
# (mesa-vulkan-drivers gives llvmpipe, a CPU Vulkan device: set GGML_VK_VISIBLE_DEVICES=0 to
# use it). When the installed Vulkan-Hpp lacks VK_EXT_layer_settings (Debian 12 ships 1.3.239),
# ggml-vulkan.cpp does not compile; this script then guards the validation-layer settings block
# (only used with GGML_VULKAN_VALIDATE) and says so.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"/\1/p' "$ROOT/edgemoe/_lib.py")"
BACKENDS=() OUT="" SRC="" SDIST="" ARCH="" VENV="" DL=OFF
JOBS="$(nproc 2>/dev/null || echo 2)"

die() { echo "build_backend: error: $*" >&2; exit 1; }
say() { echo "build_backend: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        cpu|vulkan|rpc|cuda|metal) BACKENDS+=("$1") ;;
        --out) OUT="$2"; shift ;;
        --src) SRC="$2"; shift ;;
        --sdist) SDIST="$2"; shift ;;
        --arch) ARCH="$2"; shift ;;
        --venv) VENV="$2"; shift ;;
        --jobs) JOBS="$2"; shift ;;
        --dl) DL=ON ;;
        -h|--help) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (backends: cpu vulkan rpc cuda metal; see --help)" ;;
    esac
    shift
done
[ ${#BACKENDS[@]} -gt 0 ] || die "name a backend: cpu, vulkan, rpc, cuda or metal (see --help)"
[ -z "$ARCH" ] || [ "$ARCH" = aarch64 ] || die "--arch: only aarch64 is supported"
has() { local b; for b in "${BACKENDS[@]}"; do [ "$b" = "$1" ] && return 0; done; return 1; }

NAME="$(IFS=-; echo "${BACKENDS[*]}")${ARCH:+-$ARCH}"
OUT="${OUT:-${EDGEMOE_BACKENDS:-$HOME/.cache/edgemoe/backends}/$NAME}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# -- prerequisites, checked before minutes of compiling ---------------------------------------
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found; $2"; }
need cmake "install cmake (Debian: apt-get install cmake)"
need "${CXX:-c++}" "install a C++ compiler (Debian: apt-get install g++)"
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF
             -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
             -DLLAMA_BUILD_TOOLS=OFF -DGGML_BACKEND_DL="$DL"
             "-DCMAKE_BUILD_RPATH=\$ORIGIN;\$ORIGIN/../lib")
TARGETS=(llama)
if [ "$DL" = ON ]; then
    # The CPU backend becomes a module libggml does not link; ggml refuses GGML_NATIVE there
    # (a module per ISA level comes with -DGGML_CPU_ALL_VARIANTS=ON, at many times the build).
    TARGETS+=(ggml-cpu)
    [ -z "$ARCH" ] && CMAKE_FLAGS+=(-DGGML_NATIVE=OFF)
fi
if has vulkan; then
    need glslc "install glslc (Debian: apt-get install glslc)"
    [ -f /usr/include/vulkan/vulkan.hpp ] || [ -n "${VULKAN_SDK:-}" ] \
        || die "Vulkan headers not found; install libvulkan-dev (or set VULKAN_SDK)"
    if [ -z "${VULKAN_SDK:-}" ] && ! compgen -G "/usr/share/cmake/SPIRV-Headers*" >/dev/null \
            && ! compgen -G "/usr/lib/*/cmake/SPIRV-Headers*" >/dev/null; then
        die "SPIRV-Headers' cmake package not found; install spirv-headers"
    fi
    CMAKE_FLAGS+=(-DGGML_VULKAN=ON)
    [ "$DL" = ON ] && TARGETS+=(ggml-vulkan)
fi
if has rpc; then
    # ggml-rpc-server is a llama.cpp tool: tools and the common library are configured, only
    # the server target is built.
    CMAKE_FLAGS+=(-DGGML_RPC=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON)
    TARGETS+=(ggml-rpc-server)
fi
if has cuda; then
    need nvcc "install the CUDA toolkit (nvcc on PATH)"
    CMAKE_FLAGS+=(-DGGML_CUDA=ON)
fi
if has metal; then
    [ "$(uname -s)" = Darwin ] || die "the Metal backend builds on macOS only"
    CMAKE_FLAGS+=(-DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON)
fi
if [ "$ARCH" = aarch64 ]; then
    need aarch64-linux-gnu-gcc "install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
    # armv8.2-a+dotprod: the NEON dot-product kernels of a Raspberry Pi 5 / Jetson Orin.
    CMAKE_FLAGS+=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
                  -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
                  -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod -DGGML_OPENMP=OFF)
fi

# -- source: llama-cpp-python's sdist (its vendor/llama.cpp), unpacked once -------------------
if [ -z "$SRC" ]; then
    if [ ! -f "$OUT/src/vendor/llama.cpp/CMakeLists.txt" ]; then
        if [ -z "$SDIST" ]; then
            say "downloading the llama-cpp-python $VERSION sdist"
            "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: \
                "llama-cpp-python==$VERSION" -d "$OUT/dl" >&2
            SDIST="$(ls "$OUT"/dl/llama_cpp_python-"$VERSION".tar.gz)"
        fi
        rm -rf "$OUT/src" && mkdir -p "$OUT/src"
        tar -xzf "$SDIST" -C "$OUT/src" --strip-components=1
    fi
    PYSRC="$OUT/src"
    SRC="$OUT/src/vendor/llama.cpp"
fi
[ -f "$SRC/ggml/CMakeLists.txt" ] || die "$SRC is not a llama.cpp source tree"

# -- Vulkan-Hpp older than VK_EXT_layer_settings: guard the one block that needs it ----------
VK_CPP="$SRC/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
if has vulkan && ! grep -rqs "VK_EXT_LAYER_SETTINGS_EXTENSION_NAME" "${VULKAN_SDK:+$VULKAN_SDK/include/}${VULKAN_SDK:-/usr/include}/vulkan/" \
        && ! grep -q "edgemoe: VK_EXT_layer_settings guard" "$VK_CPP"; then
    say "the installed Vulkan headers lack VK_EXT_layer_settings (e.g. Debian 12's 1.3.239):"
    say "  patching $VK_CPP to create the instance without validation-layer settings"
    python3 - "$VK_CPP" <<'EOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
pat = re.compile(r"( *)VkBool32 enable_best_practice = layer_settings;\n.*?"
                 r"vk::InstanceCreateInfo instance_create_info\(([^;]*?), &layer_setting_info\);\n",
                 re.S)
m = pat.search(src)
if not m:
    sys.exit("build_backend: error: the layer-settings block of ggml-vulkan.cpp was not found; "
             "this llama.cpp needs newer Vulkan headers (install the LunarG SDK, set VULKAN_SDK)")
ind, args = m.group(1), m.group(2)
new = (f"{ind}// edgemoe: VK_EXT_layer_settings guard (headers older than the extension)\n"
       "#ifdef VK_EXT_LAYER_SETTINGS_EXTENSION_NAME\n" + m.group(0) +
       "#else\n" + f"{ind}vk::InstanceCreateInfo instance_create_info({args});\n#endif\n")
open(path, "w").write(src[:m.start()] + new + src[m.end():])
EOF
fi

# -- into a virtualenv: pip builds llama-cpp-python from the (patched) source -----------------
if [ -n "$VENV" ]; then
    [ -x "$VENV/bin/python" ] || die "$VENV is not a virtualenv (no bin/python)"
    [ -n "${PYSRC:-}" ] || die "--venv builds llama-cpp-python's sdist; do not combine with --src"
    ARGS="${CMAKE_FLAGS[*]}"
    say "pip install llama-cpp-python==$VERSION into $VENV with CMAKE_ARGS=\"$ARGS\""
    CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "$VENV/bin/python" -m pip install \
        --force-reinstall --no-deps --no-cache-dir "$PYSRC" >&2
    say "installed; edgemoe in $VENV now loads these backends (EDGEMOE_LIB_DIR unset)"
    exit 0
fi

# -- build ------------------------------------------------------------------------------------
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
BUILD="$OUT/build"
say "configuring ${BACKENDS[*]}${ARCH:+ for $ARCH} in $BUILD"
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" "${CMAKE_FLAGS[@]}" >"$OUT/configure.log" 2>&1 \
    || { tail -30 "$OUT/configure.log" >&2; die "cmake configure failed (log: $OUT/configure.log)"; }
say "compiling ${TARGETS[*]} with $JOBS jobs (log: $OUT/build.log)"
START=$SECONDS
cmake --build "$BUILD" --target "${TARGETS[@]}" -j "$JOBS" >"$OUT/build.log" 2>&1 \
    || { grep -m20 -E "error|Error" "$OUT/build.log" >&2; die "build failed (log: $OUT/build.log)"; }
say "compiled in $((SECONDS - START)) s"

mkdir -p "$OUT/lib" "$OUT/bin"
find "$BUILD/bin" "$BUILD" -maxdepth 3 \( -name 'lib*.so*' -o -name 'lib*.dylib' \) \
    -exec cp -a {} "$OUT/lib/" \; 2>/dev/null
[ -f "$BUILD/bin/ggml-rpc-server" ] && cp -a "$BUILD/bin/ggml-rpc-server" "$OUT/bin/"
ls "$OUT"/lib/libggml-base.* >/dev/null 2>&1 || die "no libggml-base in the build output"
say "libraries in $OUT/lib${ARCH:+ (for $ARCH)}$( [ -f "$OUT/bin/ggml-rpc-server" ] && echo "; rpc server $OUT/bin/ggml-rpc-server")"
has vulkan && say "llvmpipe (a CPU Vulkan device) is skipped unless GGML_VK_VISIBLE_DEVICES=0"
echo "export EDGEMOE_LIB_DIR=$OUT/lib"
