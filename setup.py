"""Packaging for abft-fast.

``kernels/`` installs as ``abft_fast.kernels`` and ``csrc/`` as ``abft_fast.csrc`` (sources for the
JIT-built CUDA extension); nothing installs a top-level ``kernels`` module, a name that belongs to
the HuggingFace ``kernels`` package which transformers imports. In the source tree ``kernels/`` has
no ``__init__.py``: a directory without one never shadows an installed regular package, so the
checkout root on ``sys.path`` (``python -m pytest``, ``python -c`` from the root) leaves
``import kernels`` to HuggingFace's. ``abft_fast/kernels`` is a symbolic link to it, which makes
``abft_fast.kernels`` the same (namespace) package in a checkout, an editable install and a wheel.

Set ``ABFT_FAST_BUILD_CUDA=1`` to compile the CUDA extension at install time (needs nvcc and a CUDA
torch); otherwise it is JIT-compiled with ninja on first use of backend="cuda".
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "abft_fast", "_version.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)  # the single source

ext_modules, cmdclass = [], {}
if os.environ.get("ABFT_FAST_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [
        CUDAExtension(
            "abft_fast._cuda_ext",
            sources=["csrc/binding.cpp", "csrc/attention_fwd.cu", "csrc/attention_bwd.cu",
                     "csrc/probes_fwd.cu", "csrc/probes_bwd.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="abft-fast",
    version=VERSION,
    description="Fused attention with probe probabilities for Attention Behavior Fine-Tuning (ABFT)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license="Apache-2.0",
    packages=["abft_fast", "abft_fast.ops", "abft_fast.hf", "abft_fast.abft", "abft_fast.kernels",
              "abft_fast.csrc"],
    package_dir={"abft_fast": "abft_fast", "abft_fast.csrc": "csrc"},
    package_data={"abft_fast.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    install_requires=[
        # The supported range: its lower ends are the lent GPU machine's versions (torch 2.11,
        # triton 3.6, transformers 5.17), tested on the CPU by `make test-gpu-image` (torch 2.13
        # there: 2.11 has no CPU wheel on PyPI); its upper ends by `make test-newest`.
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "transformers>=5.17",
        "accelerate>=1.0",
        "safetensors",
        "tqdm",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "import-linter"],
        "abft": ["staicc", "gguf", "peft", "matplotlib"],
        # QLoRA (train --load-in-4bit): NF4 linear layers on the CPU and CUDA
        "qlora": ["bitsandbytes>=0.50", "peft"],
    },
    entry_points={"console_scripts": ["abft-fast=abft_fast.abft.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
