"""Profile the block selection (block_sparse.block_pattern) at 128K on a CUDA GPU: where its time goes."""
import torch
from torch.profiler import profile, ProfilerActivity
from tsa_patch.kernels.block_sparse import block_pattern
L=131072
q=torch.randn(32,L,128,device="cuda",dtype=torch.bfloat16); k=torch.randn(8,L,128,device="cuda",dtype=torch.bfloat16)
o=dict(gamma=0.95,block=128,min_budget=1024,js_threshold=0.1,scaling=128**-0.5)
for d in (0.1,None):
    block_pattern(q,k,**o,density=d); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        block_pattern(q,k,**o,density=d); torch.cuda.synchronize()
    print(d); print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14))
