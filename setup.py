"""flamingo_jax: Flamingo visual language models in JAX/Flax."""
from setuptools import find_packages, setup

# Versions that resolve and run together on a fresh CPU machine (see README). jax + jaxlib
# is what jax[cpu] installs; an accelerator adds its plugin with an extra below.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "transformers==4.57.6",  # 4.57 (not 5.x): open_flamingo's generate() works with it
    "tensorflow-datasets==4.9.10",
    # Reads tfds.data_source records for training: global index shuffle, threads and
    # worker processes that keep the order (so the batches never depend on them).
    "grain==0.2.18",
    "etils[epath]==1.15.0",  # every file path (local or gs://), as orbax and TFDS do
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "matplotlib==3.10.8",  # the loss-curve PNG train.py writes
    "av==18.1.0",  # PyAV: decodes video files for `prepare video` (8 frames at 1 FPS)
    "scipy==1.17.1",  # Hungarian image–sentence assignment for MMC4 documents
]

# eval.py's official scorers: pycocoevalcap (COCO's CIDEr-D; its PTB tokenizer runs
# `java`), scikit-learn (ROC-AUC), nltk + inflection (OK-VQA's stemming, as
# open_flamingo's ok_vqa_utils does; NLTK's data is a separate download), tqdm (progress).
EVAL = ["pycocoevalcap==1.2", "pycocotools==2.0.11", "scikit-learn==1.9.1", "nltk==3.10.4",
        "inflection==0.5.1", "tqdm==4.70.1"]

# PyTorch is needed only to read .pt/.bin checkpoints and for the parity tests. Pinned
# exactly: any other torch version pulls gigabytes of CUDA wheels.
TORCH = ["torch==2.13.0"]
# The reference implementations themselves (open_flamingo, open_clip, timm, torchvision)
# pin an old torch in their metadata, so they install with --no-deps from
# tests/requirements-reference.txt; these are their remaining dependencies.
# libtpu: the abstract TPU topologies train_compile.py compiles for (on a CPU machine
# too), the version jax[tpu]==0.10.2 pins; tests/test_train_compile.py needs it.
LIBTPU = ["libtpu==0.0.42.*"]
# The jax of an accelerator (jax 0.10.2's own extras): TPU VMs `pip install -e ".[tpu]"`
# (libtpu), NVIDIA GPUs `pip install -e ".[cuda]"` (the CUDA 12 plugin and its CUDA
# wheels). gcsfs: etils epath's gs:// backend when TensorFlow is not installed (prepare,
# the prepared reader, TFDS and orbax open bucket paths through epath).
GCS = ["gcsfs"]
TPU = ["jax[tpu]==0.10.2"] + GCS
CUDA = ["jax[cuda12]==0.10.2"]
TEST = TORCH + EVAL + LIBTPU + [
    "pytest==9.0.3", "pytest-xdist==3.8.0", "einops==0.8.2",
    "einops-exts==0.0.4", "ftfy==6.3.1", "sentencepiece==0.2.3", "regex"]

setup(
    name="flamingo_jax",
    version="0.1.0",
    description="Flamingo visual language models in JAX/Flax, for TPU and GPU pods",
    python_requires=">=3.10",
    packages=find_packages(include=["flamingo_jax", "flamingo_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"torch": TORCH, "eval": EVAL, "tpu_compile": LIBTPU, "test": TEST,
                    "tpu": TPU, "cuda": CUDA, "gcs": GCS},
)
