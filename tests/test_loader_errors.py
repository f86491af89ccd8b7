"""Bad model input: one clear line naming the problem and what to do, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glassbox.models.loader import default_model_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glassbox.cli", "generate", "hello", "--max-tokens", "2", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )


def assert_clear_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _write_gguf(path: Path, architecture: str) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_missing_model_path(tmp_path):
    assert_clear_error(run_cli("--model", str(tmp_path / "nope.gguf")), "does not exist", "GGUF")


@pytest.mark.parametrize("keep_bytes", [100_000, 20_000_000])
def test_truncated_gguf(tmp_path, keep_bytes):
    truncated = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as f:
        truncated.write_bytes(f.read(keep_bytes))
    assert_clear_error(run_cli("--model", str(truncated)), "truncated")


def test_corrupt_file(tmp_path):
    corrupt = tmp_path / "model.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    assert_clear_error(run_cli("--model", str(corrupt)), "corrupt")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    assert_clear_error(run_cli("--model", str(not_gguf)), "not a GGUF file")


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    _write_gguf(path, "falcon")
    assert_clear_error(run_cli("--model", str(path)), "unsupported GGUF architecture 'falcon'")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    assert_clear_error(run_cli("--model", str(tmp_path)), "unsupported model_type 'bert'")


def test_folder_without_config(tmp_path):
    assert_clear_error(run_cli("--model", str(tmp_path)), "config.json")


def test_bad_dtype():
    assert_clear_error(run_cli("--dtype", "int3"), "unknown dtype")
