"""Build varcore's compiled parts.

Extensions:
  varcore._C     C++ kernels always; CUDA kernels too when torch is a CUDA build and a toolkit is found.
  varcore._simt  the CUDA kernels compiled as C++ against the host emulation (csrc/simt), for tests.

Environment switches:
  VARCORE_CUDA=auto|1|0  build the CUDA part when possible (auto, default), always (fail loudly), never.
  VARCORE_SIMT=0|1       build the emulation extension (off by default, on in CI).
  TORCH_CUDA_ARCH_LIST   CUDA architectures; defaults to "8.0;9.0+PTX" (Ampere, Hopper, and PTX that the driver
                         compiles for newer GPUs), plus "10.0;12.0" (Blackwell) with a toolkit that knows them
                         (CUDA >= 12.8). Set it to one architecture ("9.0") for a faster build for one GPU.
  CUDA_HOME              toolkit root; found from nvcc / the usual locations when unset.
  MAX_JOBS               parallel compile jobs; defaults to the number of CPUs.
  VARCORE_DEBUG=1        -O0 -g.
  VARCORE_SANITIZE=address,undefined  compile and link the C++ parts with these -fsanitize= checks (-O1 -g);
                         used by scripts/sanitize.sh, which builds into a separate directory.
"""
import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _log(msg):
    print(f"[varcore build] {msg}", file=sys.stderr)


def _is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _find_cuda_home():
    """The toolkit root whose bin/nvcc is the real compiler (a wrapper script on PATH fools torch's guess)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        # A wrapper script usually execs the real nvcc by absolute path; read it from the script.
        if not _is_elf(nvcc):
            for token in Path(nvcc).read_text(errors="ignore").split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(str(Path(token).parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    for c in candidates:
        if c and _is_elf(os.path.join(c, "bin", "nvcc")):
            return os.path.realpath(c)
    return None


def _cuda_mode():
    mode = os.environ.get("VARCORE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"VARCORE_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


MODE = _cuda_mode()
if MODE != "0" and "CUDA_HOME" not in os.environ:
    found = _find_cuda_home()
    if found:
        os.environ["CUDA_HOME"] = found  # must be set before torch.utils.cpp_extension is imported
def _nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None."""
    import re
    import subprocess

    nvcc = os.path.join(cuda_home or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _default_archs(cuda_home):
    archs = "8.0;9.0+PTX"
    version = _nvcc_version(cuda_home)
    return archs + ";10.0;12.0" if version and version >= (12, 8) else archs


if "TORCH_CUDA_ARCH_LIST" not in os.environ:  # torch crashes when it is unset without a GPU
    os.environ["TORCH_CUDA_ARCH_LIST"] = _default_archs(os.environ.get("CUDA_HOME")) if MODE != "0" else "8.0"
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    torch_cuda = torch.version.cuda is not None
    if MODE == "0":
        return False
    if MODE == "1":
        if not torch_cuda:
            raise RuntimeError("VARCORE_CUDA=1 but the installed torch is a CPU-only build")
        if CUDA_HOME is None:
            raise RuntimeError("VARCORE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME to the toolkit root")
        return True
    if not torch_cuda:
        _log("torch is a CPU-only build: building the C++ part only")
        return False
    if CUDA_HOME is None:
        _log("no CUDA toolkit found: building the C++ part only (set CUDA_HOME or VARCORE_CUDA=1 to insist)")
        return False
    return True


def _nvidia_include_dirs():
    # Pip-installed CUDA headers (cublas, cusparse, ...) that ATen's CUDA headers include but a minimal toolkit lacks.
    site = Path(torch.__file__).resolve().parent.parent
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


def _sources(pattern):
    return sorted(glob.glob(os.path.join(CSRC, pattern)))


def _sanitize_flags():
    """-fsanitize= flags from VARCORE_SANITIZE (e.g. "address,undefined"); empty when unset."""
    wanted = os.environ.get("VARCORE_SANITIZE", "").strip()
    if not wanted:
        return []
    _log(f"sanitizers on: {wanted}")
    return [f"-fsanitize={wanted}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def build_extensions():
    debug = os.environ.get("VARCORE_DEBUG") == "1"
    sanitize = _sanitize_flags()
    opt = ["-O0", "-g"] if debug else ["-O1"] if sanitize else ["-O3"]
    # at::parallel_for is inlined into our code and is only parallel when compiled with OpenMP.
    cxx = [*opt, "-fvisibility=hidden", "-fopenmp", *sanitize]
    link = ["-fopenmp", *sanitize]
    include = [str(ROOT / CSRC)]
    with_cuda = _want_cuda()

    sources = [os.path.join(CSRC, "module.cpp"), os.path.join(CSRC, "ops.cpp")]
    sources += _sources("*/*_cpu.cpp") + _sources("*/*_torch.cpp")
    exts = []
    if with_cuda:
        sources += _sources("*/*_cuda.cu")
        include += _nvidia_include_dirs()
        nvcc = [*opt, "--expt-relaxed-constexpr", "-lineinfo"]
        _log(f"CUDA part on: CUDA_HOME={CUDA_HOME}, archs={os.environ['TORCH_CUDA_ARCH_LIST']}")
        # Recorded in the module as e.g. "sm80_sm90" (a shell- and ninja-safe token).
        archs = "_".join("sm" + a.replace(".", "").replace("+PTX", "ptx").lower()
                         for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a)
        exts.append(CUDAExtension(
            "varcore._C", sources, include_dirs=include,
            define_macros=[("VARCORE_WITH_CUDA", "1"), ("VARCORE_CUDA_ARCHS", archs)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link))
    else:
        exts.append(CppExtension("varcore._C", sources, include_dirs=include, extra_compile_args={"cxx": cxx},
                                 extra_link_args=link))

    if os.environ.get("VARCORE_SIMT", "0") == "1":
        simt_sources = sorted(set(_sources("simt/*.cpp") + _sources("*/*_simt.cpp")))
        _log(f"emulation extension varcore._simt on ({len(simt_sources)} sources)")
        exts.append(CppExtension(
            "varcore._simt", simt_sources, include_dirs=[str(ROOT / CSRC)],
            define_macros=[("VARCORE_SIMT", "1")],
            extra_compile_args={"cxx": ["-O1" if sanitize else "-O2", "-fvisibility=hidden", *sanitize]},
            extra_link_args=sanitize))
    return exts


setup(
    ext_modules=build_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
