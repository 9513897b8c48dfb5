"""The cheapest examples run end to end (tiny step counts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from upcycle import assets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_generate_shipped_model(tmp_path):
    out = run("generate.py", str(assets.DENSE_MODEL), "--max-new-tokens", "12", "--prompt", "The json module",
              cwd=tmp_path)
    text = out.split("]\n", 1)[1]
    assert text.startswith("The json module") and len(text.strip()) > len("The json module")


def test_attach_adapter_builds_and_attaches(tmp_path):
    out = run("attach_adapter.py", "--max-steps", "2", "--out", str(tmp_path / "work"), cwd=tmp_path)
    gap = float(out.split("max |dlogit| ")[1].split()[0])
    assert gap < 1e-4
    assert (tmp_path / "work" / "adapter" / "experts.safetensors").is_file()
