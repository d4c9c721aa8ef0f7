"""The allocator set-up of job and command-line processes (osad_core/allocator.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "from osad_core.allocator import tune; print(tune(), tune())"


def _probe(**env) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_job_process_tunes_glibc_once_and_can_be_told_not_to():
    assert _probe(OSAD_MALLOC_TUNE="1") == "True True"
    assert _probe(OSAD_MALLOC_TUNE="0") == "False False"
