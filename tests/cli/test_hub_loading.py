"""Loading an export by hub id, the remote-code path real users hit (it differs from loading a folder).

The export is laid out as a Hub snapshot in a temporary cache (``models--org--name/snapshots/<commit>``,
``refs/main``) and loaded offline, with a pinned revision, in a fresh process where tsa_patch cannot be imported.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tsa_patch.kernels.policy import ATTENTION_KEY

COMMIT = "0123456789abcdef0123456789abcdef01234567"

USER_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

repo, commit = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(repo, revision=commit)
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, revision=commit, dtype=torch.float32)
ids = tokenizer("\\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(30)),
                return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"module": type(model).__module__, "class": type(model).__name__,
                  "impl": model.config._attn_implementation, "tokens": ids.shape[1],
                  "finite": bool(torch.isfinite(logits).all()),
                  "sparse": [s["layer"] for s in model.tsa_statistics() if s["path"] == "sparse"]}))
"""


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, small_export):
    folder, policy = small_export
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--org--name"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "snapshots" / COMMIT / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # the Hub adds it
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, policy


def test_load_by_hub_id_with_pinned_revision(hub_cache, fresh_python, monkeypatch, tmp_path):
    cache, policy = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    result = fresh_python(USER_SCRIPT, "org/name", COMMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "TsaLlamaForCausalLM" and report["impl"] == ATTENTION_KEY
    assert report["module"].startswith("transformers_modules.org.name.")  # the hub code path, per repo and commit
    assert report["tokens"] > 100 and report["finite"]
    assert report["sparse"] == policy.sparse_layers


def test_inspect_by_hub_id_offline(cli, hub_cache, monkeypatch):
    cache, policy = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    result = cli.invoke("inspect", "org/name", "--json")
    assert result.exit_code == 0, result.stderr
    report = cli.json(result.stdout)
    assert report["ok"] and report["policy"]["layers"] == policy.to_dict()["layers"]


def test_inspect_by_hub_id_sees_every_file_of_the_snapshot(cli, hub_cache, monkeypatch, tmp_path):
    """A hub id is verified on the whole repository, not only the files a load downloads."""
    cache, _ = hub_cache
    tampered = tmp_path / "hub"
    shutil.copytree(cache, tampered, symlinks=True)
    (tampered / "models--org--name" / "snapshots" / COMMIT / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tampered))
    result = cli.invoke("inspect", "org/name")
    cli.assert_one_line_error(result, "org/name fails verification: pytorch_model.bin (pickle weights")
