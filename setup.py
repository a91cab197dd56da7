"""oneflow_jax: concurrent mixed-modal generation with Edit Flows + Flow Matching, in JAX/Flax."""
import setuptools

setuptools.setup(
    name="oneflow_jax",
    version="0.1.0",
    description="OneFlow (insertion Edit Flow over text + Flow Matching over image latents) in JAX/Flax",
    packages=setuptools.find_packages(include=["oneflow_jax", "oneflow_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array-record",
        "tensorflow-datasets",
        "sentencepiece",
        "tokenizers",
        "pyarrow",
        "ml-collections",
        "clu",
        "tensorflow-cpu",
        "tensorboard",
        "numpy",
        "pillow",
        "matplotlib",
        "absl-py",
        "etils[epath]",
    ],
    extras_require={
        # Keep the range satisfied by the locally available torch 2.13.0 CPU wheel.
        "torch": ["torch>=2.1,<3", "safetensors"],
        "examples": ["scikit-image"],   # the photographs of the real-data walk-through (launch/real_data_example.sh)
        "metrics": ["pycocoevalcap"],   # COCO's caption metrics (eval --task caption); METEOR needs java
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "filelock", "safetensors", "transformers>=4.45", "diffusers>=0.30",
                 "scikit-image", "pycocoevalcap"],
    },
)
