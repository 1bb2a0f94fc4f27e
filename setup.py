"""Build script for gtalign_fast.

Builds the compiled extension ``gtalign_fast._C`` with ``torch.utils.cpp_extension``:

* CPU kernels (``csrc/cpu/*.cpp``, OpenMP, -O3) always;
* CUDA kernels (``csrc/cuda/*.cu``) as well when the installed torch has CUDA and ``nvcc`` is found.

Set ``GTALIGN_FAST_NO_EXT=1`` to skip the extension entirely: the package then runs on its
Triton and pure-PyTorch reference backends. ``GTALIGN_FAST_FORCE_CUDA=1`` builds the CUDA sources
even when torch reports no GPU (for building on a machine without one).

The Triton kernels live in the top-level ``kernels/`` folder (no ``__init__.py``: a top-level
package named ``kernels`` would shadow Hugging Face's, which transformers imports). The package
``gtalign_fast.kernels`` finds them there in a checkout or an editable install; a wheel gets a copy
of them inside ``gtalign_fast/kernels/`` (``BuildPyWithKernels``).
"""

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "gtalign_fast", "gtalign_fast.game", "gtalign_fast.game.judges", "gtalign_fast.integrations",
    "gtalign_fast.integrations.verl", "gtalign_fast.kernels", "gtalign_fast.ops", "gtalign_fast.recipes",
    "gtalign_fast.sampling", "gtalign_fast.training",
]


class BuildPyWithKernels(build_py):
    """build_py that also copies the top-level ``kernels/*.py`` into ``gtalign_fast/kernels/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout (gtalign_fast/kernels/__init__.py)
        target = os.path.join(self.build_lib, "gtalign_fast", "kernels")
        self.mkpath(target)
        for source in sorted(glob.glob(os.path.join(ROOT, "kernels", "*.py"))):
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extension_modules():
    """Return (ext_modules, cmdclass); empty when the build is switched off."""
    if _flag("GTALIGN_FAST_NO_EXT"):
        print("gtalign_fast: GTALIGN_FAST_NO_EXT is set, not building the C++/CUDA extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    with_cuda = torch.version.cuda is not None and has_nvcc and (
        torch.cuda.is_available() or _flag("GTALIGN_FAST_FORCE_CUDA")
    )
    # -g0: no debug info (Python's own CFLAGS ask for -g, which doubles compile time and .so size).
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
    if with_cuda:
        print(f"gtalign_fast: building CPU + CUDA kernels ({len(cuda_sources)} .cu files)")
        extension = CUDAExtension(
            "gtalign_fast._C",
            cpu_sources + cuda_sources,
            define_macros=[("GTALIGN_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        print("gtalign_fast: building CPU kernels only (no CUDA torch or no nvcc)")
        extension = CppExtension(
            "gtalign_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithKernels, **cmdclass},
)
