"""tools/download_model.sh fails fast and says what to do where the Hub cannot be reached."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_offline_download_gives_a_clear_message(tmp_path):
    env = dict(os.environ, PRETRAINED_DIR=str(tmp_path), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        ["sh", str(REPO / "tools/download_model.sh"), "InternVL2-2B"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "could not download OpenGVLab/InternVL2-2B" in result.stderr
    assert "make_tiny_model.py" in result.stderr
    assert "OpenGVLab/InternVL2-2B -> " + str(tmp_path / "InternVL2-2B") in result.stdout


def test_usage_without_a_name():
    result = subprocess.run(["sh", str(REPO / "tools/download_model.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
