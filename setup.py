"""Install fastnl and build its C++/CUDA extension (fastnl._C) from csrc/.

The extension is a CUDA extension where nvcc and a CUDA build of torch are present and a
CPU-only C++ extension otherwise. The Triton kernels in kernels/ are installed as
``fastnl.kernels``.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (e.g. `setup.py --name`)
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp and not cu:
        return [], {}
    use_cuda = (
        bool(cu)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FASTNL_CPU_ONLY", "0") != "1"
    )
    # No -std here: torch adds the C++ standard its headers need (C++17 or C++20).
    cxx_flags = ["-O3"]
    depends = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh")))
    if use_cuda:
        arch = os.environ.get("FASTNL_CUDA_ARCH", "90")
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
        for a in arch.split(";"):
            nvcc_flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        # -lcudart needs the toolkit's lib dir, which CUDA_HOME misses when it is derived from
        # an nvcc outside the toolkit tree (e.g. /usr/local/bin/nvcc).
        roots = [cpp_extension.CUDA_HOME] + sorted(glob.glob("/usr/local/cuda*"), reverse=True)
        cudart_dirs = [
            d
            for root in roots
            for d in (os.path.join(root, "lib64"), os.path.join(root, "lib"))
            if os.path.exists(os.path.join(d, "libcudart.so"))
        ]
        ext = cpp_extension.CUDAExtension(
            "fastnl._C",
            cpp + cu,
            library_dirs=cudart_dirs[:1],
            extra_compile_args={"cxx": cxx_flags + ["-DFASTNL_WITH_CUDA"], "nvcc": nvcc_flags + ["-DFASTNL_WITH_CUDA"]},
            depends=depends,
        )
    else:
        ext = cpp_extension.CppExtension("fastnl._C", cpp, extra_compile_args={"cxx": cxx_flags}, depends=depends)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastnl",
    version="0.1.0",
    description="Fast, memory-lean video person re-ID with non-local spatial and temporal attention",
    packages=find_packages(include=["fastnl", "fastnl.*"]) + ["fastnl.kernels"],
    package_dir={"fastnl.kernels": "kernels"},
    package_data={"fastnl": ["engine_table.json"]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastnl = fastnl.cli:main"]},
)
