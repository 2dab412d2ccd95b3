"""The Files API and Qwen-Long's fileid:// through the real server, with the openai SDK and httpx, on
SQLite and PostgreSQL.

Every file is made by the test (tests/documents.py). A document's extracted text is checked where it
matters, in the prompt: a ``fileid://`` request must cost exactly the prompt tokens of the same request
with the expected text written into the system message.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import documents as docs
from tests.databases import BACKENDS, database_for
from tests.support import MODELS, Server, create_key, start_server, wait_for

CONFIG = """
[[models]]
id = "qwen-long"
engine = "local"
path = "{qwen25}"
max_output = 4

# A snapshot id of the same family with a small window, for "exceeds the model's limit".
[[models]]
id = "qwen-long-latest"
engine = "local"
path = "{qwen25}"
context_length = 256
max_output = 4

# Not a Qwen-Long model: fileid:// is plain text to it.
[[models]]
id = "qwen-plus"
engine = "local"
path = "{qwen25}"
max_output = 4

[files]
max_file_bytes = 1048576
max_files_per_key = 4
max_bytes_per_key = 2500000
max_archive_entries = 200
max_unpacked_bytes = 50000000
max_files_per_request = 3
max_pages = 50
extract_timeout = 120
"""

# Deadline of one request on a busy 2-core machine (an upload runs an extraction process).
TIMEOUT = 120.0


@dataclass
class Gateway:
    server: Server
    database_url: str | None  # None: the home's SQLite file

    @property
    def files_dir(self) -> Path:
        return self.server.home / "files"

    def new_key(self) -> str:
        return create_key(self.server.home, f"k-{time.monotonic_ns()}", database_url=self.database_url)

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=key or self.new_key(), base_url=self.server.compat_url, timeout=TIMEOUT, max_retries=0
        )

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.compat_url,
            headers={"Authorization": f"Bearer {key or self.server.api_key}"},
            timeout=TIMEOUT,
        )

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows straight from the server's database (``?`` placeholders)."""
        if self.database_url is None:
            with sqlite3.connect(self.server.home / "gateway.db") as db:
                return list(db.execute(sql, args))
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), args)
            return [] if cursor.description is None else [tuple(r) for r in cursor.fetchall()]

    def stored(self) -> set[str]:
        """Everything in the files directory (part files included)."""
        return {str(p.relative_to(self.files_dir)) for p in self.files_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", params=BACKENDS)
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with database_for(str(request.param)) as url:
        home = tmp_path_factory.mktemp(f"files-{request.param}")
        config = home / "config.toml"
        config.write_text(CONFIG.format(qwen25=MODELS / "tiny-qwen2.5"))
        server = start_server(home, "--config", str(config), database_url=url)
        try:
            yield Gateway(server, url)
        finally:
            server.stop()


def _prompt_tokens(client: openai.OpenAI, system: str, model: str = "qwen-long") -> int:
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "这篇文章讲了什么?"}],
    )
    assert completion.usage is not None
    return completion.usage.prompt_tokens


# -- the seed's example ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "text"),
    [
        (
            "百炼系列手机产品介绍.docx",
            docs.docx_bytes("百炼 X1 手机", "售价 3999 元", table=[["型号", "屏幕"], ["X1", "6.7"]]),
            "百炼 X1 手机\n售价 3999 元\n型号\t屏幕\nX1\t6.7",
        ),
        (
            "phones.pdf",
            docs.pdf_bytes("Bailian X1 phone", "Price 3999 yuan"),
            "Bailian X1 phone\nPrice 3999 yuan",
        ),
    ],
    ids=["docx", "pdf"],
)
def test_seed_qwen_long_example(gw: Gateway, tmp_path: Path, name: str, data: bytes, text: str) -> None:
    path = docs.write(tmp_path / name, data)
    client = gw.client()
    # The seed's code, unchanged but for base_url and api_key.
    file_object = client.files.create(file=path, purpose="file-extract")
    completion = client.chat.completions.create(
        model="qwen-long",
        messages=[
            {"role": "system", "content": f"fileid://{file_object.id}"},
            {"role": "user", "content": "这篇文章讲了什么?"},
        ],
    )
    assert file_object.id.startswith("file-fe-") and len(file_object.id) == len("file-fe-") + 24
    assert (file_object.object, file_object.bytes, file_object.filename) == ("file", len(data), name)
    assert (file_object.purpose, file_object.status) == ("file-extract", "processed")
    assert abs(file_object.created_at - time.time()) < 600
    assert completion.model == "qwen-long" and completion.choices[0].message.role == "assistant"
    # The document's tokens are input tokens: exactly those of the same request with its text inline.
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == _prompt_tokens(client, text)
    assert completion.usage.prompt_tokens > _prompt_tokens(client, "") + 5
    ledger = gw.query(
        "SELECT prompt_tokens FROM usage_ledger WHERE request_id = ?", completion.id[len("chatcmpl-") :]
    )
    assert ledger == [(completion.usage.prompt_tokens,)]


@pytest.mark.parametrize(
    ("name", "data", "text"),
    [
        (
            "prices.xlsx",
            docs.xlsx_bytes([["name", "price"], ["X1", 3999]]),
            "# Prices\nname\tprice\nX1\t3999",
        ),
        ("deck.pptx", docs.pptx_bytes("slide one", "slide two"), "slide one\nslide two"),
        ("book.epub", docs.epub_bytes("chapter one", "chapter two"), "chapter one\nchapter two"),
        (
            "page.html",
            b"<!DOCTYPE html><html><head><title>t</title><script>x()</script></head>"
            b"<body><h1>Title</h1><p>Body &amp; text</p></body></html>",
            "Title\nBody & text",
        ),
        ("notes.md", "# 标题\n\n- item\n".encode(), "# 标题\n\n- item"),
        # Magic bytes pick the parser, not the name: a PDF called .txt, and text called .pdf.
        ("really-a-pdf.txt", docs.pdf_bytes("inside a pdf"), "inside a pdf"),
        ("really-text.pdf", b"plain words", "plain words"),
    ],
    ids=["xlsx", "pptx", "epub", "html", "md", "pdf-named-txt", "text-named-pdf"],
)
def test_formats(gw: Gateway, name: str, data: bytes, text: str) -> None:
    client = gw.client()
    file_object = client.files.create(file=(name, data), purpose="file-extract")
    assert _prompt_tokens(client, f"fileid://{file_object.id}") == _prompt_tokens(client, text)


# -- list, retrieve, content, delete ---------------------------------------------------------------


def test_list_retrieve_content_delete(gw: Gateway) -> None:
    key = gw.new_key()
    client = gw.client(key)
    first = client.files.create(file=("a.txt", b"first file"), purpose="file-extract")
    batch = client.files.create(
        file=("in.jsonl", b'{"custom_id": "1"}\n\n{"custom_id": "2"}\n'), purpose="batch"
    )
    third = client.files.create(file=("c.txt", b"third file"), purpose="file-extract")
    assert batch.id.startswith("file-batch-") and batch.purpose == "batch"

    assert client.files.retrieve(first.id).model_dump() == first.model_dump()
    assert client.files.content(batch.id).content == b'{"custom_id": "1"}\n\n{"custom_id": "2"}\n'

    # Newest first; the SDK's auto-pagination follows has_more with after=<last id>.
    assert [f.id for f in client.files.list(limit=1)] == [third.id, batch.id, first.id]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == [third.id, batch.id] and page.has_more is True
    assert [f.id for f in client.files.list(purpose="batch")] == [batch.id]
    with gw.http(key) as http:
        today = time.strftime("%Y%m%d", time.gmtime())
        tomorrow = time.strftime("%Y%m%d", time.gmtime(time.time() + 86_400))
        listed = http.get("/files", params={"create_after": today, "create_before": tomorrow}).json()
        assert listed["object"] == "list" and len(listed["data"]) == 3 and listed["has_more"] is False
        assert http.get("/files", params={"create_before": today}).json()["data"] == []
        assert http.get("/files", params={"create_after": tomorrow}).json()["data"] == []
        for params, param in (
            ({"create_after": "2025-01-01"}, "create_after"),
            ({"limit": "0"}, "limit"),
            ({"purpose": "fine-tune"}, "purpose"),
            ({"order": "asc"}, "order"),
        ):
            refused = http.get("/files", params=params)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text

    deleted = client.files.delete(first.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (first.id, "file", True)
    assert not (gw.files_dir / first.id).exists() and not (gw.files_dir / f"{first.id}.txt").exists()
    assert gw.query("SELECT id FROM files WHERE id = ?", first.id) == []
    for call in (
        lambda: client.files.retrieve(first.id),
        lambda: client.files.delete(first.id),
        lambda: client.files.content(first.id),
        lambda: client.files.delete("file-fe-000000000000000000000000"),
        lambda: client.files.retrieve("gateway.db"),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert "cannot be found" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.files.content("../../gateway.db")


def test_another_keys_file_is_not_found(gw: Gateway) -> None:
    owner, other = gw.new_key(), gw.new_key()
    mine = gw.client(owner).files.create(file=("mine.txt", b"private words"), purpose="file-extract")
    stranger = gw.client(other)
    for call in (
        lambda: stranger.files.retrieve(mine.id),
        lambda: stranger.files.content(mine.id),
        lambda: stranger.files.delete(mine.id),
    ):
        with pytest.raises(openai.NotFoundError):  # 404, never 403: no oracle for other keys' ids
            call()
    assert list(stranger.files.list()) == []
    with pytest.raises(openai.BadRequestError) as err:
        _prompt_tokens(stranger, f"fileid://{mine.id}")
    assert err.value.body["message"] == f"File [id:{mine.id}] cannot be found."  # type: ignore[index]
    # Still there for its owner.
    assert gw.client(owner).files.retrieve(mine.id).id == mine.id


def test_quotas(gw: Gateway) -> None:
    client = gw.client(gw.new_key())
    ids = [client.files.create(file=(f"{i}.txt", b"words"), purpose="file-extract").id for i in range(4)]
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("5.txt", b"words"), purpose="file-extract")
    assert err.value.code == "BadRequest.TooMany"
    assert err.value.body["message"] == "Out of number, <4> of <4> files has been uploaded."  # type: ignore[index]
    client.files.delete(ids[0])  # a deleted file frees its slot
    client.files.create(file=("5.txt", b"words"), purpose="file-extract")

    sized = gw.client(gw.new_key())
    big = b"word " * 180_000  # 900,000 bytes; the key may hold 2,500,000
    sized.files.create(file=("1.txt", big), purpose="file-extract")
    sized.files.create(file=("2.txt", big), purpose="file-extract")
    with pytest.raises(openai.BadRequestError) as err:
        sized.files.create(file=("3.txt", big), purpose="file-extract")
    assert err.value.code == "BadRequest.TooMany" and "at most 2500000 bytes" in err.value.message


def test_concurrent_uploads_cannot_share_the_last_slot(gw: Gateway) -> None:
    key = gw.new_key()
    client = gw.client(key)
    for i in range(3):
        client.files.create(file=(f"{i}.txt", b"words"), purpose="file-extract")
    start = threading.Barrier(3)
    outcomes: list[str] = []

    def upload(i: int) -> None:
        start.wait()
        try:
            client.files.create(file=(f"late-{i}.txt", b"words"), purpose="file-extract")
            outcomes.append("ok")
        except openai.BadRequestError as exc:
            outcomes.append(str(exc.code))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert sorted(outcomes) == ["BadRequest.TooMany", "BadRequest.TooMany", "ok"]
    assert len(list(client.files.list())) == 4


def test_a_client_that_hangs_up_mid_upload_leaves_nothing(gw: Gateway) -> None:
    key = gw.new_key()
    before = gw.stored()
    host, port = gw.server.base_url.removeprefix("http://").split(":")
    head = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfile-extract\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="cut.txt"\r\n\r\n'
    )
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /compatible-mode/v1/files HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {key}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 900000\r\n\r\n"
            + head
            + b"a" * 300_000
        )
        # The part file exists while the body is arriving...
        wait_for(lambda: any(n.startswith(".incoming/") for n in gw.stored() - before), "the part file")
    # ...and is gone once the server sees the client leave.
    wait_for(lambda: gw.stored() - before == set(), "the part file's removal")
    assert list(gw.client(key).files.list()) == []


# -- hostile uploads -------------------------------------------------------------------------------

# Built when a case runs (some take a moment to compress), each with the refusal's reason text.
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    # One entry that packs 1000:1 (8 MiB of zeros in ~8 KiB).
    "zip-bomb-ratio": (
        lambda: docs.docx_with({"word/media/zeros.bin": b"\0" * (8 * 1024 * 1024)}),
        "unpacks to more",
    ),
    # 60 entries of 1 MiB each, every one under the ratio check's floor: 60 MiB declared, 50 MB allowed.
    "zip-bomb-declared-total": (
        lambda: docs.docx_with({f"word/media/{i}.bin": b"\0" * (1024 * 1024) for i in range(60)}),
        "unpacks to more",
    ),
    # Declares 1 KiB, unpacks to 20 MiB: read no further than declared, then its CRC fails.
    "zip-bomb-lying-size": (docs.lying_size_docx, "damaged or malformed"),
    "zip-entry-count": (
        lambda: docs.docx_with({f"word/media/x{i}.xml": b"x" for i in range(300)}),
        "unpacks to more",
    ),
    "zip-nested": (
        lambda: docs.docx_with({"word/media/inner.zip": docs.zip_of({"a.txt": b"x"})}),
        "archive inside",
    ),
    "zip-encrypted": (docs.encrypted_flag_docx, "encrypted"),
    "zip-not-a-document": (lambda: docs.zip_of({"a.txt": b"hello"}), "not a document"),
    # One content stream that inflates to 80 MiB (pypdf stops at 75 MB).
    "pdf-bomb": (
        lambda: docs.pdf_bytes("a", content_stream=b" " * (80 * 1024 * 1024), flate=True),
        "unpacks to more",
    ),
    "pdf-page-loop": (lambda: docs.pdf_bytes("a", kids_loop=True), "damaged or malformed"),
    "pdf-encrypted": (lambda: docs.encrypted_pdf_bytes("secret"), "encrypted"),
    "pdf-too-many-pages": (
        lambda: docs.pdf_bytes(*(f"page {i}" for i in range(51))),
        "exceeds page limits (50 pages)",
    ),
    "binary": (lambda: bytes(range(256)) * 64, "not a document"),
    "blank": (lambda: b"  \n\t\n", "content blank"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_upload_is_refused_and_leaves_nothing(gw: Gateway, case: str) -> None:
    make, expected = HOSTILE[case]
    data = make()
    key = gw.new_key()
    before = gw.stored()
    rows_before = gw.query("SELECT count(*) FROM files")
    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).files.create(file=("upload.docx", data), purpose="file-extract")
    message = err.value.body["message"]  # type: ignore[index]
    assert message.startswith(("Invalid file [id:file-fe-", "File [id:file-fe-")), message
    assert expected in message, message
    assert err.value.body["param"] == "file"  # type: ignore[index]
    assert gw.stored() - before == set()
    assert gw.query("SELECT count(*) FROM files") == rows_before
    assert list(gw.client(key).files.list()) == []


def test_oversize_upload(gw: Gateway) -> None:
    key = gw.new_key()
    before = gw.stored()
    big = b"a" * (1024 * 1024 + 1)
    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).files.create(file=("big.txt", big), purpose="file-extract")
    assert "exceeds size limit" in err.value.message

    # Without a Content-Length (chunked): cut off while streaming, at the cap.
    def body() -> Iterator[bytes]:
        boundary = b"--xyz"
        yield boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(40):  # 40 MiB offered, 1 MiB allowed
            yield b"a" * (1024 * 1024)
        yield b"\r\n" + boundary + b"--\r\n"

    with gw.http(key) as http:
        answer = http.post(
            "/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
        )
    assert answer.status_code == 400 and "exceeds size limit" in answer.json()["error"]["message"]
    # The purpose came first, so the refused id is a batch file's.
    assert answer.json()["error"]["message"].startswith("File [id:file-batch-")
    assert gw.stored() - before == set()
    assert list(gw.client(key).files.list()) == []


def test_bad_forms(gw: Gateway) -> None:
    key = gw.new_key()
    with gw.http(key) as http:
        refused = http.post("/files", files={"file": ("a.txt", b"x")}, data={"purpose": "fine-tune"})
        assert refused.status_code == 400
        assert refused.json()["error"] == {
            "message": "'purpose' must be 'file-extract' or 'batch'",
            "type": "invalid_request_error",
            "param": "purpose",
            "code": None,
        }
        extra = http.post(
            "/files", files={"file": ("a.txt", b"x")}, data={"purpose": "batch", "expires": "1"}
        )
        assert extra.status_code == 400 and extra.json()["error"]["param"] == "expires"
        not_form = http.post("/files", json={"purpose": "file-extract"})
        assert not_form.status_code == 400
        no_file = http.post("/files", data={"purpose": "file-extract"}, files={"other": ("a", b"x")})
        assert no_file.status_code == 400
        bad_jsonl = http.post("/files", files={"file": ("b.jsonl", b"[1, 2]\n")}, data={"purpose": "batch"})
        assert bad_jsonl.status_code == 400 and "JSONL" in bad_jsonl.json()["error"]["message"]
    assert list(gw.client(key).files.list()) == []


# -- fileid:// -------------------------------------------------------------------------------------


def test_several_files_comma_joined_and_in_several_system_messages(gw: Gateway) -> None:
    client = gw.client()
    a = client.files.create(file=("a.txt", b"alpha document"), purpose="file-extract")
    b = client.files.create(file=("b.txt", b"beta document"), purpose="file-extract")
    joined = _prompt_tokens(client, f"fileid://{a.id},fileid://{b.id}")
    assert joined == _prompt_tokens(client, "alpha document\n\nbeta document")
    stream = client.chat.completions.create(
        model="qwen-long",
        messages=[
            {"role": "system", "content": f"fileid://{a.id},fileid://{b.id}"},
            {"role": "user", "content": "这篇文章讲了什么?"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert [u.prompt_tokens for u in usages] == [joined]

    def usage(messages: list[dict[str, str]]) -> int:
        completion = client.chat.completions.create(model="qwen-long", messages=messages)  # type: ignore[arg-type]
        assert completion.usage is not None
        return completion.usage.prompt_tokens

    question = {"role": "user", "content": "Compare them."}
    assert usage(
        [
            {"role": "system", "content": f"fileid://{a.id}"},
            {"role": "system", "content": f"fileid://{b.id}"},
            question,
        ]
    ) == usage(
        [
            {"role": "system", "content": "alpha document"},
            {"role": "system", "content": "beta document"},
            question,
        ]
    )
    # To a model that is not Qwen-Long the reference is only text (the same checkpoint and template:
    # the id's characters cost more tokens than the two words of the document).
    assert _prompt_tokens(client, f"fileid://{a.id}", model="qwen-plus") > _prompt_tokens(
        client, f"fileid://{a.id}"
    )


def test_fileid_errors(gw: Gateway) -> None:
    key = gw.new_key()
    client = gw.client(key)
    doc = client.files.create(file=("a.txt", b"some words"), purpose="file-extract")
    batch = client.files.create(file=("in.jsonl", b'{"a": 1}\n'), purpose="batch")
    long_doc = client.files.create(
        file=("long.txt", ("many words here " * 200).encode()), purpose="file-extract"
    )

    def refused(system: str, model: str = "qwen-long") -> dict[str, Any]:
        with pytest.raises(openai.BadRequestError) as err:
            _prompt_tokens(client, system, model=model)
        body: dict[str, Any] = err.value.body  # type: ignore[assignment]
        return body

    missing = "file-fe-0123456789abcdef01234567"
    assert refused(f"fileid://{missing}")["message"] == f"File [id:{missing}] cannot be found."
    assert refused(f"fileid://{missing}")["param"] == "messages.0.content"
    four = ",".join(f"fileid://{doc.id}" for _ in range(4))
    assert refused(four)["message"] == "Too many files provided."
    assert refused(f"fileid://{batch.id}")["message"].startswith(f"Invalid file [id:{batch.id}].")
    assert refused(f"fileid://{long_doc.id}", model="qwen-long-latest")["message"] == (
        "Total message token length exceed model limit (256 tokens)."
    )
    # A file still being parsed (a row in that state, put straight into the database: an upload's
    # extraction can't be held open on demand from outside).
    parsing = "file-fe-" + "a" * 24
    key_id = gw.query("SELECT key_id FROM files WHERE id = ?", doc.id)[0][0]
    gw.query(
        "INSERT INTO files (id, key_id, filename, purpose, bytes, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        parsing,
        key_id,
        "slow.pdf",
        "file-extract",
        1,
        "processing",
        "2026-12-01 00:00:00",
    )
    assert refused(f"fileid://{parsing}")["message"] == "File parsing in progress, please try again later."
    assert client.files.retrieve(parsing).status == "processing"
