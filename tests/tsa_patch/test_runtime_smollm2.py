"""The runtime on the real SmolLM2-135M-Instruct: padding, tau = 0, sparse layers, generate()."""

from __future__ import annotations

import pytest
import torch

from tsa_patch.data import load_documents
from tsa_patch.kernels.attention import tsa_statistics
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy
from tsa_patch.models import apply_policy_

# Small window and floors so that prompts of a few hundred tokens take the sparse path on CPU.
SMALL = dict(window=16, min_tokens=32, activation_length=96)
SPARSE_LAYERS = list(range(10, 30))


@pytest.fixture
def patched(smollm2_fp32):
    model, tokenizer = smollm2_fp32

    def apply(policy: TsaPolicy):
        return apply_policy_(model, policy)

    yield apply, model, tokenizer
    model.set_attn_implementation("sdpa")
    delattr(model.config, CONFIG_KEY)


def _essay_ids(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    text = "\n\n".join(load_documents("paul-graham")[:6])
    return tokenizer(text).input_ids[offset : offset + n_tokens]


def _left_padded(tokenizer, sequences):
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, width - len(seq) :] = torch.tensor(seq)
        mask[b, width - len(seq) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def test_left_padded_batch_equals_each_sequence_alone(patched):
    apply, model, tokenizer = patched
    sequences = [_essay_ids(tokenizer, 300), _essay_ids(tokenizer, 180, offset=1000)]
    ids, mask, positions = _left_padded(tokenizer, sequences)
    width = ids.shape[1]
    with torch.no_grad():
        # The dense model's own batched-vs-alone difference: padding changes the shapes BLAS and SDPA work on, so
        # fp32 rounding differs by an amount that depends on the CPU and BLAS. TSA's difference is bounded by it.
        dense_batched = model(ids, attention_mask=mask, position_ids=positions).logits
        dense_alone = [model(torch.tensor([seq])).logits[0] for seq in sequences]
        apply(TsaPolicy.uniform(30, 0.05, SPARSE_LAYERS, **SMALL))
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        batch_stats = tsa_statistics(model)
        for b, seq in enumerate(sequences):
            alone = model(torch.tensor([seq])).logits[0]
            alone_stats = tsa_statistics(model)
            rows = slice(width - len(seq), None)
            # Exact: each sequence keeps the same tokens per head in the batch as alone, and predicts the same tokens.
            for layer in SPARSE_LAYERS:
                assert batch_stats[layer]["path"] == "sparse"
                assert batch_stats[layer]["kept"][b] == alone_stats[layer]["kept"][0]
                assert alone_stats[layer]["kept"][0][0] < len(seq), "the sparse path must drop tokens"
            # Rounding: TSA's sparse layers compute each sequence unpadded, exactly as alone, so the batch differs
            # only through the dense layers, as the dense model does: at most twice the dense model's own
            # difference, plus 16 fp32 roundings (eps 1.2e-7) at the logits' magnitude for a difference of zero.
            dense_difference = (dense_batched[b, rows] - dense_alone[b]).abs().max().item()
            bound = 2 * dense_difference + 16 * torch.finfo(torch.float32).eps * alone.abs().max().item()
            assert (batched[b, rows] - alone).abs().max().item() <= bound, f"sequence {b}"
            # The same greedy token wherever rounding within that bound cannot swap the top two logits.
            top2 = alone.topk(2, dim=-1).values
            decided = (top2[:, 0] - top2[:, 1]) > 2 * bound
            assert decided[-1] and decided.float().mean() > 0.9
            assert torch.equal(batched[b, rows].argmax(-1)[decided], alone.argmax(-1)[decided]), f"sequence {b}"


def test_tau_zero_gives_dense_logits(patched):
    apply, model, tokenizer = patched
    ids = torch.tensor([_essay_ids(tokenizer, 200)])
    with torch.no_grad():
        dense = model(ids).logits
        apply(TsaPolicy.uniform(30, 0.0, **SMALL))
        assert torch.equal(model(ids).logits, dense)


def test_sparse_layers_drop_tokens_and_generate_works(patched):
    apply, model, tokenizer = patched
    apply(TsaPolicy.uniform(30, 0.02, SPARSE_LAYERS, **SMALL))
    ids = torch.tensor([_essay_ids(tokenizer, 400)])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 405)
    stats = tsa_statistics(model)  # the prefill's, not the decode steps'
    assert [s["layer"] for s in stats if s["path"] == "sparse"] == SPARSE_LAYERS
    for s in stats:
        if s["path"] == "sparse":
            kept = s["kept"][0]
            assert len(kept) == 9 and SMALL["min_tokens"] + SMALL["window"] <= kept[0] < 400


def test_all_rows_drop_keys_only_and_generate_works(patched):
    """``rows="all"``: a sparse layer selects the same tokens as the paper's compression (the first sparse layer sees
    the same input either way), computes every query row over them, and its measured share of the attention lies
    between the paper's ``kept ** 2`` and 1; padded batches and ``generate()`` work."""
    apply, model, tokenizer = patched
    ids = torch.tensor([_essay_ids(tokenizer, 400)])
    first = SPARSE_LAYERS[0]
    with torch.no_grad():
        apply(TsaPolicy.uniform(30, 0.05, SPARSE_LAYERS, **SMALL))
        model(ids)
        paper = tsa_statistics(model)
        apply(TsaPolicy.uniform(30, 0.05, SPARSE_LAYERS, rows="all", **SMALL))
        model(ids)
        stats = tsa_statistics(model)
    assert stats[first]["kept"] == paper[first]["kept"] and paper[first]["kept"][0][0] < 400
    for s in stats:
        if s["path"] == "sparse":
            kept = sum(s["kept"][0]) / len(s["kept"][0]) / 400
            assert kept**2 < s["attention_cost"][0] < 1.0
    sequences = [_essay_ids(tokenizer, 300), _essay_ids(tokenizer, 180, offset=1000)]
    padded, mask, positions = _left_padded(tokenizer, sequences)
    with torch.no_grad():
        model(padded, attention_mask=mask, position_ids=positions)
        batch = tsa_statistics(model)
        model(torch.tensor([sequences[1]]))
        alone = tsa_statistics(model)
    assert batch[first]["kept"][1] == alone[first]["kept"][0]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 405)
