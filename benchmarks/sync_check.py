"""Where a sparse layer synchronises with the host, if anywhere: one TSA layer (Llama-3.1-8B shapes, bf16) through the
attention function at each length, on the default (synced) path and with ``tsa_sync_free=True``, under
``torch.cuda.set_sync_debug_mode("warn")``, printing every synchronising call with the line that made it.

    python benchmarks/sync_check.py [--lengths 2048,8192,32768]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from tsa_patch.kernels import attention
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy


class StubAttention(torch.nn.Module):
    """What the attention function reads from a model's attention module: config (with the policy), layer index,
    GQA group size; also used by sync_free_probe.py."""

    def __init__(self, policy: TsaPolicy, groups: int = 4):
        super().__init__()
        self.config = type("Config", (), {})()
        setattr(self.config, CONFIG_KEY, policy.to_dict())
        self.layer_idx, self.num_key_value_groups, self.is_causal = 0, groups, True
        self.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    args = parser.parse_args()
    module = StubAttention(TsaPolicy.uniform(1, 0.005, window=128, min_tokens=1024, activation_length=1024))
    for length, sync_free in ((int(n), free) for n in args.lengths.split(",") for free in (False, True)):
        q, k, v = (torch.randn(1, h, length, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
        attention.tsa_attention_forward(module, q, k, v, None, scaling=128**-0.5, tsa_sync_free=sync_free)  # tune
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                attention.tsa_attention_forward(module, q, k, v, None, scaling=128**-0.5, tsa_sync_free=sync_free)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        path = "sync-free" if sync_free else "synced (by design: one read of the kept count)"
        print(f"L={length} ({path}): {len(caught)} synchronising call(s)")
        for warning in caught:
            print("  ", str(warning.message).splitlines()[0], f"at {warning.filename}:{warning.lineno}")


if __name__ == "__main__":
    main()
