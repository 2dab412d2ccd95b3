"""What an upload costs the server: memory (is it really streamed?), CPU, and extraction time.

Starts ``qwen-gateway serve`` (tiny-qwen2.5 as qwen-long) on a temporary home, makes a key, then:

- uploads a ``--mb`` MB batch JSONL file (validated line by line, no extraction child) and prints the
  server's peak RSS before and after (``VmHWM`` from ``/proc/<pid>/status``: the exact high-water mark,
  no sampling) and the server's CPU seconds for the upload;
- uploads a ``--pages``-page PDF and a docx of as many paragraphs (file-extract) and prints each upload's
  wall time and the server's own CPU seconds (the parsing itself runs in the child process).

    python benchmarks/bench_uploads.py [--mb 100] [--pages 200]

The machine may be shared: CPU seconds and the peak RSS are the figures to trust, wall times move.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import documents as docs  # noqa: E402
from tests.support import MODELS, start_server  # noqa: E402

CONFIG = """
[[models]]
id = "qwen-long"
engine = "local"
path = "{qwen25}"
max_output = 4

[files]
max_file_bytes = 1073741824
max_bytes_per_key = 10737418240
"""


def _hwm_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        config = home / "config.toml"
        config.write_text(CONFIG.format(qwen25=MODELS / "tiny-qwen2.5"))
        server = start_server(home, "--config", str(config))
        try:
            proc = psutil.Process(server.proc.pid)
            client = httpx.Client(
                base_url=server.compat_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=600
            )
            jsonl = home / "big.jsonl"
            line = (
                b'{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "'
                + b"a" * 900
                + b'"}]}}\n'
            )
            with jsonl.open("wb") as fh:
                for _ in range(args.mb * 1024 * 1024 // len(line)):
                    fh.write(line)
            size = jsonl.stat().st_size
            before, cpu0, t0 = _hwm_kib(proc.pid), _cpu(proc), time.monotonic()
            with jsonl.open("rb") as fh:
                answer = client.post("/files", files={"file": ("big.jsonl", fh)}, data={"purpose": "batch"})
            assert answer.status_code == 200, answer.text
            wall, cpu, after = time.monotonic() - t0, _cpu(proc) - cpu0, _hwm_kib(proc.pid)
            print(f"batch upload {size / 1e6:.0f} MB: wall {wall:.2f} s, server CPU {cpu:.2f} s")
            print(f"server peak RSS (VmHWM) before {before / 1024:.1f} MiB, after {after / 1024:.1f} MiB")
            for name, data in (
                (
                    "doc.pdf",
                    docs.pdf_bytes(*(f"Page {i}: some words on this page." for i in range(args.pages))),
                ),
                (
                    "doc.docx",
                    docs.docx_bytes(*(f"Paragraph {i}: some words here." for i in range(args.pages))),
                ),
            ):
                cpu0, t0 = _cpu(proc), time.monotonic()
                answer = client.post("/files", files={"file": (name, data)}, data={"purpose": "file-extract"})
                assert answer.status_code == 200, answer.text
                print(
                    f"{name} ({len(data) / 1e3:.0f} kB, {args.pages} pages/paragraphs): wall "
                    f"{time.monotonic() - t0:.2f} s, server CPU {_cpu(proc) - cpu0:.3f} s"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
