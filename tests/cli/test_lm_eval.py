"""The exported checkpoint as an lm-evaluation-harness `hf` model with trust_remote_code=True, on a local task
(offline). Skipped when lm_eval is not installed (`make test` installs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

TASK = """task: tsa_local_niah
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_runs_the_export(small_export, tmp_path, smollm2):
    from transformers import AutoTokenizer

    from tsa_patch.suite import SuiteBuilder

    folder, _ = small_export
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    builder = SuiteBuilder(tokenizer)
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(2):
            sample = builder.sample("niah_single", 400, i)
            f.write(json.dumps({"prompt": sample.prompt(tokenizer), "answer": " " + sample.answers[0]}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tsa_local_niah.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", "tsa_local_niah",
               "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "1",
               "--output_path", str(tmp_path / "results")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = list((tmp_path / "results").rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]["tsa_local_niah"]
    assert 0.0 <= results["acc,none"] <= 1.0
