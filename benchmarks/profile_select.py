"""Where the selection stage spends its time on the GPU (torch.profiler), at a short and a long length: the
runtime's Triton selection against its PyTorch twin, each with the synced path's read-back of the count.

    python benchmarks/profile_select.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

from tsa_patch.kernels.reference import select_tokens_padded_ref
from tsa_patch.kernels.triton_select import select_tokens_padded

for seq_len in (8192, 131072):
    pooled = torch.rand(32, seq_len - 128, device="cuda") ** 8
    for select in (select_tokens_padded, select_tokens_padded_ref):
        for _ in range(3):
            int(select(pooled, seq_len, 0.005, 1024)[1][0])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                int(select(pooled, seq_len, 0.005, 1024)[1][0])
            torch.cuda.synchronize()
        print(f"=== {select.__name__}, L={seq_len}, 10 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
