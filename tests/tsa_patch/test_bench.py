"""tsa-patch bench's measurement code, dry-run on a CPU with tiny shapes (its times mean nothing there): every
path it times runs, and the rows carry what the tables and results JSON read."""

from __future__ import annotations

import pytest
import torch

from tsa_patch import bench

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.MODEL_CONFIGS, "tiny", TINY)
    monkeypatch.setattr(bench, "_DEFAULTS", {**bench._DEFAULTS, "window": 16, "min_tokens": 16})
    return "tiny"


def test_bench_layer_times_both_paths(tiny):
    row = bench.bench_layer(tiny, 200, 0.5, dtype=torch.float32, device="cpu")
    assert row["kept_tokens"] < 200 and row["runtime_path"] == "synced"
    for path in ("synced", "sync_free"):
        assert row[path]["total"]["median_ms"] > 0 and row[path]["overhead_ms"] == pytest.approx(
            row[path]["total"]["median_ms"] - row[path]["stages"]["attend" if path == "synced" else "attend_gathered"]
            ["median_ms"])
    assert row["sync_free"]["cuda_graph"] == {"error": "no CUDA"}
    assert {"speedup", "ideal_speedup", "fraction_of_ideal", "overhead_pct_of_dense", "best_path"} <= set(row)


def test_bench_prefill_times_both_baselines(tiny):
    row = bench.bench_prefill(tiny, 200, 0.5, dtype=torch.float32, device="cpu")
    assert {"dense-default", "dense-cudnn", "tsa", "tsa-sync-free"} <= set(row)
    assert row["speedup"] > 0 and row["speedup_vs_default"] > 0 and row["speedup_sync_free"] > 0


def test_bench_tables_render_the_rows(tiny, tmp_path):
    from tsa_patch.cli._output import Output
    from tsa_patch.cli.bench import _print_tables

    layer = bench.bench_layer(tiny, 200, 0.5, dtype=torch.float32, device="cpu")
    prefill = bench.bench_prefill(tiny, 200, 0.5, dtype=torch.float32, device="cpu")
    _print_tables(Output(json_mode=False), tiny, "cpu", tmp_path / "bench.json", [layer], [prefill])
