"""The README's commands and code are what a new user types: they must work as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path):
    api = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", api, flags=re.S)
    assert blocks, "the README's Python API section has no example"
    for code in blocks:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "outputs" / "api-demo" / "model.safetensors").is_file()


def test_demo_command_runs_on_a_tiny_preset(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "prune.cli", "preview", "--preset", "wavlm_base_tiny",
                             "--sparsity", "0.5", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reached = float(re.search(r"param sparsity reached: (\S+)", result.stdout).group(1))
    assert abs(reached - 0.5) < 0.01
    error = float(re.search(r"max relative error over all hidden states: (\S+)", result.stdout).group(1))
    assert error < 1e-5
    assert (out / "config.json").is_file()
    # a typo'd flag value fails fast, in one line, naming the problem
    bad = subprocess.run([sys.executable, "-m", "prune.cli", "preview", "--preset", "hubert_bsae"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown --preset 'hubert_bsae'" in bad.stderr
    assert "Traceback" not in bad.stderr
