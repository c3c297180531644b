"""Shared fixtures: the real SmolLM2-135M-Instruct (converted once per cache), and fresh-process helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# tests/numerics.py (the derived numeric bounds) is importable as `numerics` from every test module.
sys.path.insert(0, str(Path(__file__).parent))

# Tests never touch the network: hub ids resolve from the local cache or fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `make test` runs one worker per core: one intra-op thread each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
if not HAS_CUDA:
    # Run the Triton kernels on CPU through the interpreter; this must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
    # the heavy modules first: the test workers take whole modules in this order, so none is left alone with one
    items.sort(key=lambda item: "heavy" not in item.keywords)

# Prepended to every fresh-process script: makes `import tsa_patch` fail, as on a user's machine that only
# has the exported checkpoint. Remote code that imported tsa_patch would break here.
BLOCK_TSA_PATCH = textwrap.dedent(
    """
    import importlib.abc, sys
    class _BlockTsaPatch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tsa_patch" or name.startswith("tsa_patch."):
                raise ImportError("tsa_patch is not installed for checkpoint users")
    sys.meta_path.insert(0, _BlockTsaPatch())
    """
)


def run_python(code: str, *args: str, block_tsa_patch: bool = True, timeout: int = 600,
               python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process (stdin closed: any interactive prompt fails instead of hanging)."""
    script = (BLOCK_TSA_PATCH if block_tsa_patch else "") + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env, cwd=Path(__file__).parent)


@pytest.fixture(scope="session")
def fresh_python():
    """``run_python``: run a script in a fresh process where ``tsa_patch`` cannot be imported."""
    return run_python


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, resolved to its converted bf16 safetensors folder (converted once per cache)."""
    from tsa_patch.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2):
    """SmolLM2 loaded in float32 on CPU, with its tokenizer (shared: tests must restore any change they make)."""
    from tsa_patch.models import load_model

    return load_model(smollm2)


@pytest.fixture(scope="session")
def small_export(tmp_path_factory, smollm2):
    """An export of SmolLM2 with the drift rule and a small window (TSA engages at ~100 tokens): (folder, policy)."""
    from tsa_patch.calibrate import CalibrationConfig, calibrate
    from tsa_patch.export import export
    from tsa_patch.models import load_model

    model, tokenizer = load_model(smollm2)
    config = CalibrationConfig(method="drift", samples=1, seq_len=256, tau=0.02, window=16, min_tokens=32,
                               activation_length=96)
    policy = calibrate(model, tokenizer, config, source_model=smollm2.spec).policy
    folder = tmp_path_factory.mktemp("exports") / "small"
    export(smollm2, policy, folder, command="tsa-patch export small (test fixture)")
    return folder, policy
