"""mediclip_jax: few-shot medical anomaly detection (MediCLIP) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="mediclip_jax",
    version="0.1.0",
    description="MediCLIP few-shot medical anomaly detection with on-device anomaly synthesis, in JAX/Flax NNX.",
    python_requires=">=3.11",
    package_data={"mediclip_jax": ["assets/*.gz"]},
    packages=find_packages(include=["mediclip_jax", "mediclip_jax.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "numpy",
        "pillow",
        "ftfy",  # CLIP tokenizer text cleaning, as OpenAI/open_clip
        "regex",  # \p{L}/\p{N} classes of the CLIP pre-tokenizer
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "tqdm",  # training progress bar
        "matplotlib",  # colour maps and ROC/PR/histogram figures (evaluate/figures.py, Agg backend)
        "grain>=0.2.18",  # the input pipeline (data_pipelines/grain_input.py): files and TFDS builds alike
        "scipy",  # connected components and hole filling of segmentations (evaluate/segmentation.py)
        "scikit-learn",  # K-means staging and its NMI/ARI (evaluate/staging.py)
    ],
    extras_require={
        # Reference implementations for parity tests; torch pinned to the CPU build that is available offline.
        "test": [
            "pytest",
            "torch==2.13.0",
            "transformers",
            "diffusers",
            "opencv-python-headless",
            "tensorboard",  # reads back our event files in tests
        ],
        # The benchmark's host mode: the pixel tasks in numpy/OpenCV (synthesis/reference_numpy.py).
        "bench": ["opencv-python-headless"],
        # launch/export.py: ONNX and jax.export artefacts (docs/export.md). jax2onnx itself is NOT listed: its
        # declared deps pin orbax-checkpoint<0.11.37 (a downgrade) and pull equinox, dm-pix, netron, orbax-export,
        # huggingface-hub it does not need here; install it beside this extra with
        #   pip install --no-deps jax2onnx==0.17.1
        "export": ["onnx>=1.20.1", "onnx-ir>=1.1", "onnxruntime>=1.24.1", "flatbuffers"],
        # What `launch/predict.py --onnx` needs, JAX-free. An extra cannot drop the base requirements, so a
        # JAX-free env installs the package itself with --no-deps (docs/export.md):
        #   pip install --no-deps -e . && pip install onnxruntime numpy pillow matplotlib absl-py tqdm
        "onnx_inference": ["onnxruntime>=1.24.1", "numpy", "pillow", "matplotlib", "absl-py", "tqdm"],
        # TFDS ArrayRecord datasets (launch/prepare_data.py, data.source="tfds") read by random access through
        # grain; no TensorFlow: tensorflow-datasets declares it only in its own extras (docs/data.md).
        "tfds": ["tensorflow-datasets>=4.9.10", "array-record>=0.8.6"],
    },
)
