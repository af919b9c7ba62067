"""chmr_jax: CHMR (cell-aware hierarchical multi-modal molecular representations) in JAX/Flax."""
from setuptools import find_packages, setup

# The jax this project is tested with. launch/tpu_pod.sh installs jax[tpu]==JAX_PIN on every pod worker,
# so a pod never picks up a newer, untested jax; install_requires below stays a range for local use.
JAX_PIN = "0.10.2"

setup(
    name="chmr_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of CHMR molecular representation learning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["chmr_jax", "chmr_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "rdkit",
        "numpy",
        "ml-collections",
        "chex",
        "tensorflow-datasets",
        "absl-py",
        # The PNG plots of `chmr-jax stress` and `chmr-jax report` (the issue asks for matplotlib).
        "matplotlib",
        # Parquet export of `chmr-jax embed` (the reference Parquet writer; no TensorFlow involved).
        "pyarrow",
        # The random-forest baseline and ensemble of `chmr-jax benchmark` (spec §8-9), t-SNE in reports.
        "scikit-learn",
        # TensorBoard event files without TensorFlow (a maintained writer instead of our own protobuf encoding).
        "tensorboardX",
        # Progress bars (featurization, downloads, embedding, training) instead of a hand-written bar.
        "tqdm",
        # gs:// workdirs: etils.epath's backend for gs:// without TensorFlow is fsspec + gcsfs.
        "gcsfs",
    ],
    extras_require={
        # scipy / scikit-learn are also the independent references the tests compare against.
        # libtpu (through jax's own tpu extra, so it matches the installed jax): `chmr-jax compile` and its
        # test compile the step for TPU topologies on a CPU machine. Linux x86_64 wheels only.
        # gcp-storage-emulator: the local GCS server tests/test_cloud_paths.py runs gs:// workdirs against.
        "dev": ["pytest", "scipy", "scikit-learn", "gcp-storage-emulator",
                "jax[tpu]; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        # Only for legacy (pre-zip) torch.save files; `chmr-jax convert` reads the zip format without torch.
        "torch": ["torch"],
    },
    entry_points={"console_scripts": ["chmr-jax=chmr_jax.cli:main"]},
)
