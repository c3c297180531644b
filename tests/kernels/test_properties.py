"""Property tests: the runtime against brute force over random shapes, tau, window, min_tokens and padding."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsa_patch.kernels.attention import STATS_ATTR, tsa_attention_forward
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy
from tsa_patch.kernels.tsa import tsa_attention
from numerics import ATTENTION_RELATIVE, layout_atol


@st.composite
def problems(draw):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    window = draw(st.integers(1, 24))
    kv_len = draw(st.integers(window + 2, 160))
    chunk = draw(st.booleans())
    q_len = draw(st.integers(window, kv_len - 1)) if chunk and kv_len - 1 >= window else kv_len
    return dict(kv_heads=kv_heads, heads=kv_heads * group, kv_len=kv_len, q_len=q_len, window=window,
                head_dim=draw(st.sampled_from([8, 16, 24])), tau=draw(st.floats(0.0, 0.6)),
                min_tokens=draw(st.integers(0, 40)), pool=draw(st.sampled_from([1, 3, 7])),
                selection=draw(st.sampled_from(["query_head", "kv_group"])), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_tsa_attention_equals_dense_restricted_to_its_kept_set(brute, problem):
    gen = torch.Generator().manual_seed(problem["seed"])
    p = problem
    q = torch.randn(p["heads"], p["q_len"], p["head_dim"], generator=gen)
    k = torch.randn(p["kv_heads"], p["kv_len"], p["head_dim"], generator=gen)
    v = torch.randn(p["kv_heads"], p["kv_len"], p["head_dim"], generator=gen)
    out, kept = tsa_attention(q, k, v, tau=p["tau"], window=p["window"], pool_kernel=p["pool"],
                              min_tokens=p["min_tokens"], selection=p["selection"], scaling=p["head_dim"] ** -0.5)
    assert kept.shape[0] == (p["heads"] if p["selection"] == "query_head" else p["kv_heads"])
    assert (kept[:, 1:] > kept[:, :-1]).all() and kept.min() >= 0 and kept.max() < p["kv_len"]
    tail = p["window"] if p["q_len"] == p["kv_len"] else p["q_len"]
    assert (kept[:, -tail:] == torch.arange(p["kv_len"] - tail, p["kv_len"])).all()
    assert kept.shape[1] - tail >= min(p["min_tokens"], p["kv_len"] - tail)
    ref = brute.restricted_attention(q, k, v, kept, p["head_dim"] ** -0.5).transpose(0, 1)
    assert brute.relative_error(out, ref) < ATTENTION_RELATIVE[torch.float32]


class _Module(torch.nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.config = type("Config", (), {})()
        setattr(self.config, CONFIG_KEY, policy.to_dict())
        self.layer_idx, self.is_causal = 0, True
        self.eval()


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 120), min_size=1, max_size=4), tau=st.floats(0.0, 0.5),
       window=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_left_padded_batch_equals_each_sequence_alone(lengths, tau, window, seed):
    policy = TsaPolicy.uniform(1, tau, window=window, min_tokens=4, activation_length=window + 1)
    module = _Module(policy)
    module.num_key_value_groups = 2
    gen = torch.Generator().manual_seed(seed)
    width, d = max(lengths), 8
    q, k, v = (torch.randn(len(lengths), heads, width, d, generator=gen) for heads in (4, 2, 2))
    valid = torch.stack([torch.arange(width) >= width - n for n in lengths])
    mask = torch.ones(width, width, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    out, _ = tsa_attention_forward(module, q, k, v, mask, scaling=d**-0.5)
    stats = getattr(module, STATS_ATTR, None)
    if stats is not None and stats["path"] == "sparse":
        assert len(stats["kept"]) == len(lengths)  # one entry per sequence: each chose its own tokens
    for b, n in enumerate(lengths):
        alone, _ = tsa_attention_forward(module, q[b:b + 1, :, -n:], k[b:b + 1, :, -n:], v[b:b + 1, :, -n:], None,
                                         scaling=d**-0.5)
        assert torch.allclose(out[b, width - n:], alone[0], atol=layout_atol(alone), rtol=0)
        if stats is not None and stats["path"] == "sparse":
            assert (out[b, : width - n] == 0).all()  # padded query rows are never computed
