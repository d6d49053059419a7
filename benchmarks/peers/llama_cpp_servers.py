"""The serving peers: llama.cpp's own `llama-server` and llama-cpp-python's `llama_cpp.server`.

`llama-server` is built from the llama.cpp source vendored in llama-cpp-python's sdist (the
same llama.cpp the installed wheel wraps), with CMake, and cached under
~/.cache/lmforge-peers/ so a second run reuses the binary; nothing prebuilt is downloaded
(the web UI's prebuilt assets are switched off too). The build takes tens of minutes on two
cores, so it runs under `nice`; CI never calls this (only benchmarks/serve.py does).

    python benchmarks/peers/llama_cpp_servers.py   # build (or find) llama-server, print its path
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE_DIR = Path.home() / ".cache" / "lmforge-peers"
SOURCE_DIR = CACHE_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
BUILD_DIR = CACHE_DIR / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-build"
LLAMA_SERVER = BUILD_DIR / "bin" / "llama-server"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",  # the same -march=native the wheel's own build uses on this machine
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else it fetches the web UI from Hugging Face
    "-DLLAMA_OPENSSL=OFF",
]
# ggml's AMX kernels fault (ldtilecfg) where the kernel does not grant AMX to processes, as in VMs;
# on such CPUs build what .ci/run builds the Python binding with: every x86 extension but AMX.
NO_AMX_OPTIONS = [
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX_VNNI=ON",
    "-DGGML_AMX_INT8=OFF",
]  # fmt: skip


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def fetch_source() -> Path:
    """The llama.cpp tree from llama-cpp-python's sdist, downloaded by pip once and unpacked."""
    if (SOURCE_DIR / "CMakeLists.txt").exists():
        return SOURCE_DIR
    sdist_dir = CACHE_DIR / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist_dir)],
            check=True,
        )  # fmt: skip
    with tarfile.open(sdist) as archive:
        archive.extractall(CACHE_DIR, filter="data")
    return SOURCE_DIR


def build_llama_server(jobs: int = 2) -> Path:
    """Path of the cached `llama-server` binary, building it first if it is missing."""
    if LLAMA_SERVER.exists():
        return LLAMA_SERVER
    source = fetch_source()
    nice = ["nice", "-n", "19"]
    options = [*CMAKE_OPTIONS, *NO_AMX_OPTIONS] if cpu_has_amx() else CMAKE_OPTIONS
    subprocess.run([*nice, "cmake", "-S", str(source), "-B", str(BUILD_DIR), *options], check=True)
    subprocess.run([*nice, "cmake", "--build", str(BUILD_DIR), "--target", "llama-server", "-j", str(jobs)], check=True)
    return LLAMA_SERVER


def llama_cpp_server_missing() -> str | None:
    """Why `python -m llama_cpp.server` cannot run here (its [server] extra), or None when it can."""
    for module in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn", "fastapi"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'llama-cpp-python[server]=={LLAMA_CPP_PYTHON_VERSION}')"
    return None


if __name__ == "__main__":
    print(build_llama_server(jobs=int(os.environ.get("JOBS", "2"))))
