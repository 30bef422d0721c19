"""Two processes of 4 CPU devices each, joined by jax.distributed: sharding, qdot and save / load across hosts."""

import pathlib
import socket
import subprocess
import sys

WORKER = pathlib.Path(__file__).with_name("two_process_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_quantize_multiply_save_and_load(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"process {i}: OK" in out, out[-3000:]
