"""benchmarks/span_select_compile.py: span_select compiled for sm_90 without a GPU (Triton's bundled ptxas)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.cpu
def test_compile_reports_code_size_and_resources():
    """In a fresh process: the tool unsets TRITON_INTERPRET before importing triton, which this session has set."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "span_select_compile.py"), "--widths", "64",
                          "--warps", "2,4"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = [int(line.split("SASS instructions: ")[1]) for line in out.stdout.splitlines()
              if "SASS instructions" in line]
    assert len(counts) == 2 and all(c > 100 for c in counts), out.stdout
    assert out.stdout.count("REG:") == 2


@pytest.mark.cpu
def test_bad_widths_are_one_line_errors():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "span_select_compile.py"), "--widths", "100"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "--widths: powers of two" in out.stderr
