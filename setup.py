from setuptools import find_packages, setup

setup(
    name="nsync-jax",
    version="0.1.0",
    description="NSYNC contrastive style fine-tuning of Stable Diffusion in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["nsync_jax", "nsync_jax.*", "configs"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        # Configs and tokenizers only: the models are ours (nsync_jax/models/).
        "transformers>=5",
        "huggingface_hub>=1.32",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.10",  # Used without TensorFlow via tfds.data_source.
        "ml_collections>=1.1",
        "absl-py",
        "numpy",
        "pillow",
        "safetensors>=0.6",
        "tensorboardX>=2.6",
        "tqdm",
    ],
    extras_require={
        # torch (CPU build) and diffusers' PyTorch classes check our loading and export;
        # peft: diffusers' load_lora_weights needs it (tests/test_lora_export.py);
        # scikit-learn: the style benchmark's digits and scorers (tests/test_digits.py);
        # matplotlib: the style benchmark's plots (a slow test runs the benchmark).
        "bench": ["scikit-learn>=1.4", "matplotlib>=3.8"],
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.15",
            "torch==2.13.0",
            # Current PyTorch diffusers: the parity reference and the export verifier.
            "diffusers>=0.42",
            "peft>=0.17",
            "scikit-learn>=1.4",
            "matplotlib>=3.8",
        ],
    },
)
