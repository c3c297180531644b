"""The Token Sparse Attention runtime (installed as ``tsa_patch.kernels``).

Every file here is copied flat into exported checkpoints and imports only torch, transformers, guarded triton
and its siblings (by relative import), never ``tsa_patch``.
"""
