"""tsa-patch: calibrate and export Hugging Face causal LMs that run Token Sparse Attention."""

__version__ = "0.1.0"
