"""A disk that fills up in the middle of an upload: a real one (a 512 KiB tmpfs mounted as the files
directory; mounting needs root, else the test is skipped saying so)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support import MODELS, Server, create_key, start_server

CONFIG = """
[[models]]
id = "qwen-long"
engine = "local"
path = "{qwen25}"
max_output = 4

[files]
dir = "{files_dir}"
max_file_bytes = 4194304
"""


@pytest.fixture(scope="module")
def full_disk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    home = tmp_path_factory.mktemp("disk-full")
    files_dir = home / "small-disk"
    files_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(files_dir)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        config = home / "config.toml"
        config.write_text(CONFIG.format(qwen25=MODELS / "tiny-qwen2.5", files_dir=files_dir))
        server = start_server(home, "--config", str(config))
        try:
            yield server, files_dir
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", str(files_dir)], check=False)


def test_disk_full_mid_upload_leaves_nothing(full_disk_server: tuple[Server, Path]) -> None:
    server, files_dir = full_disk_server
    key = create_key(server.home, f"k-{time.monotonic_ns()}")
    client = openai.OpenAI(api_key=key, base_url=server.compat_url, timeout=120, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        # 2 MiB: under the size cap, four times what the disk holds.
        client.files.create(file=("big.txt", b"word " * (400 * 1024)), purpose="file-extract")
    assert err.value.body["message"].startswith("Invalid file [id:file-fe-")  # type: ignore[index]
    assert "no space left" in err.value.message
    assert [p for p in files_dir.rglob("*") if p.is_file()] == []
    assert list(client.files.list()) == []
    import sqlite3

    with sqlite3.connect(server.home / "gateway.db") as db:
        assert list(db.execute("SELECT id FROM files")) == []
    # The space is back: a small upload works.
    small = client.files.create(file=("small.txt", b"fits"), purpose="file-extract")
    assert small.status == "processed"
