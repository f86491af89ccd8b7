"""Two "hosts" over loopback: two torchrun agents (--nnodes 2, one process each) form the group that
`glassbox.worker` joins; rank 0 runs `glassbox generate`, and its tokens are those of one rank here."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import free_port

from glassbox import LLM, SamplingParams

PROMPT = "The history of the Roman Empire is long and complicated. It began"


def test_two_torchrun_hosts_give_the_outputs_of_one_rank(tiny_model_dir):
    folder = str(tiny_model_dir("qwen2"))
    port = free_port()

    def host(node_rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                "-m", "glassbox.worker", "generate", PROMPT, "--model", folder, "--max-tokens", "12", "--json",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    hosts = [host(0), host(1)]
    try:
        outputs = [h.communicate(timeout=240) for h in hosts]
    finally:
        for h in hosts:
            h.kill()
            h.wait()
    assert [h.returncode for h in hosts] == [0, 0], [err[-2000:] for _, err in outputs]
    got = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert outputs[1][0].strip() == ""  # rank 1 prints nothing: it only computes
    with LLM(folder, kv_cache_memory=8 << 20) as one:  # the same quantization as the command line's default
        expected = one.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0].token_ids
    assert got["token_ids"] == expected


def test_worker_outside_torchrun_says_how_to_start_it():
    result = subprocess.run([sys.executable, "-m", "glassbox.worker", "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "torchrun" in result.stderr


def test_generate_with_two_ranks_prints_one_ranks_tokens(tiny_model_dir):
    folder = str(tiny_model_dir("qwen3"))
    args = ["generate", PROMPT, "--model", folder, "--max-tokens", "12", "--json", "--tensor-parallel-size", "2"]
    result = subprocess.run([sys.executable, "-m", "glassbox.cli", *args], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    with LLM(folder, kv_cache_memory=8 << 20) as one:  # the same quantization as the command line's default
        expected = one.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0].token_ids
    assert json.loads(result.stdout.strip().splitlines()[-1])["token_ids"] == expected
