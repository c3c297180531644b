"""Where the selection stage spends its time on the GPU (torch.profiler), at a short and a long length.

    python benchmarks/profile_select.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

from tsa_patch.kernels.reference import select_tokens_ref

for seq_len in (8192, 131072):
    scores = torch.rand(32, seq_len - 128, device="cuda") ** 8
    for _ in range(3):
        select_tokens_ref(scores, seq_len, 0.005, 7, 1024)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            select_tokens_ref(scores, seq_len, 0.005, 7, 1024)
        torch.cuda.synchronize()
    print(f"=== select_tokens_ref, L={seq_len}, 10 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
