"""Locate and load the ggml and llama shared libraries that llama-cpp-python installs.

We bind their C API with ctypes ourselves (each module binds only the functions it uses), but we
never import the `llama_cpp` Python package at run time: we only borrow its compiled libraries.
The libraries are loaded once, RTLD_GLOBAL, in dependency order, so that ggml backends that are
built as separate libraries find the symbols of libggml-base.

EDGEMOE_LIB_DIR overrides the directory (e.g. a llama.cpp build with Vulkan or CUDA, from
scripts/build_backend.sh). A build with GGML_BACKEND_DL keeps its backends (the CPU one included)
in modules that libggml does not link: they are registered with ggml_backend_load_all_from_path
from that directory the first time the registry is used.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

from edgemoe.errors import EdgeMoeError

# The llama-cpp-python release whose C ABI our bindings follow (see pyproject.toml).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def _shared_suffix() -> str:
    if sys.platform == "darwin":
        return ".dylib"
    if sys.platform == "win32":
        return ".dll"
    return ".so"


@lru_cache(maxsize=None)
def lib_dir() -> Path:
    override = os.environ.get("EDGEMOE_LIB_DIR")
    if override:
        path = Path(override)
        if not path.is_dir():
            raise EdgeMoeError(f"EDGEMOE_LIB_DIR={override} is not a directory")
        return path
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeMoeError(
            "llama-cpp-python is not installed; edgemoe needs its ggml/llama shared libraries "
            f"(pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION})"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (pkg / "lib", pkg):
        if any(candidate.glob(f"*ggml-base*{_shared_suffix()}*")):
            return candidate
    raise EdgeMoeError(f"no libggml-base{_shared_suffix()} found under {pkg}")


def _path(stem: str) -> Path | None:
    """The library file for `stem` (e.g. 'ggml-base'), with or without a 'lib' prefix."""
    directory = lib_dir()
    suffix = _shared_suffix()
    for name in (f"lib{stem}{suffix}", f"{stem}{suffix}"):
        if (directory / name).exists():
            return directory / name
    return None


def _find(stem: str) -> Path:
    path = _path(stem)
    if path is None:
        raise EdgeMoeError(f"{stem}{_shared_suffix()} not found in {lib_dir()}")
    return path


@lru_cache(maxsize=None)
def _load(stem: str) -> ctypes.CDLL:
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    path = _find(stem)
    try:
        return ctypes.CDLL(str(path), mode=mode)
    except OSError as exc:
        raise EdgeMoeError(f"cannot load {path}: {exc}") from exc


def ggml_base() -> ctypes.CDLL:
    """Tensors, ops, graphs, quantization, backend interfaces."""
    return _load("ggml-base")


@lru_cache(maxsize=None)
def ggml() -> ctypes.CDLL:
    """The backend registry (ggml_backend_dev_*), with every backend of the build registered."""
    ggml_base()
    if _path("ggml-cpu") is not None:  # linked into libggml unless backends are modules
        _load("ggml-cpu")
    lib = _load("ggml")
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    if lib.ggml_backend_dev_count() == 0:
        # GGML_BACKEND_DL: libggml-cpu-<variant>, libggml-vulkan, ... are loaded at run time.
        load = lib.ggml_backend_load_all_from_path
        load.argtypes, load.restype = [ctypes.c_char_p], None
        load(str(lib_dir()).encode())
        if lib.ggml_backend_dev_count() == 0:
            raise EdgeMoeError(f"{lib_dir()}: ggml registered no backend (no libggml-cpu*, "
                               "nor any other backend module, loaded)")
    return lib


def llama() -> ctypes.CDLL:
    """libllama: vocab, tokenizer and chat templates (and the reference runner)."""
    ggml()
    return _load("llama")
