"""The README's examples run as written."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_quickstart_trains_tiny_deepseek_v3_and_reports_the_dump(tmp_path):
    out = _run([str(ROOT / "examples/quickstart.py"), "--steps", "3", "--cpu", "--dump", str(tmp_path / "d")], tmp_path)
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.strip().startswith("step")]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert f"dump: {tmp_path / 'd'}/graph_000" in out
    assert (tmp_path / "d" / "graph_000" / "backward.py").exists()


def test_custom_pass_example_shows_its_stats(tmp_path):
    out = _run([str(ROOT / "examples/custom_pass.py")], tmp_path)
    assert "count_matmul_flops stats: {'modified': True" in out
    assert "# built by count_matmul_flops (modified=True, matmuls_gflop=" in out
