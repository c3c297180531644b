"""Profile the block selection (``block_sparse.block_pattern``) at 128K on a CUDA GPU: where its time goes.

    python benchmarks/profile_block_select.py

Llama-3.1-8B attention shapes (32 query / 8 KV heads, d = 128), bf16, random inputs, FlexPrefill's settings;
once with a forced density (what the benchmark runs) and once with the coverage rule.
"""

import torch
from torch.profiler import ProfilerActivity, profile

from tsa_patch.kernels.block_sparse import block_pattern

SEQ_LEN, HEAD_DIM = 131072, 128
OPTIONS = dict(gamma=0.95, block=128, min_budget=1024, js_threshold=0.1, scaling=HEAD_DIM**-0.5)


def main() -> None:
    query = torch.randn(32, SEQ_LEN, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(8, SEQ_LEN, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    for density in (0.1, None):
        block_pattern(query, key, **OPTIONS, density=density, backend="triton")  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            block_pattern(query, key, **OPTIONS, density=density, backend="triton")
            torch.cuda.synchronize()
        print(f"density {density}")
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=14))


if __name__ == "__main__":
    main()
