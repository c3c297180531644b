"""Triton, when it is installed: the one guarded import of the runtime.

A checkpoint must still load without Triton (CPU machines, or GPUs without it); ``HAS_TRITON`` then tells
``tsa.py`` to use the PyTorch reference stages. transformers skips imports inside ``try`` when it checks a
checkpoint's remote-code requirements.
"""

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TRITON = True
except ImportError:
    triton = tl = TensorDescriptor = None
    HAS_TRITON = False
