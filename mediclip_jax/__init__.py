"""mediclip_jax: few-shot medical image anomaly detection (MediCLIP) in JAX/Flax NNX."""

__version__ = "0.1.0"
