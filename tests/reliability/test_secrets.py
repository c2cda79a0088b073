"""An API key never lands in a log, report, manifest, cache or table.

A real `recaug run` (and a re-run, and `recaug preview`) use the HTTP engine against a local
OpenAI-compatible stub server that answers some requests with 429 or 500 first, some with a proxy's
HTML page, and some with a final 401, and whose error bodies echo the request's Authorization header
back (as some proxies do), long enough that the key straddles the point where error texts are cut.
The key is a fresh random string given only through the environment. Afterwards every file under the
test's folder (Parquet read column by column, and every file's raw bytes) and everything the commands
printed are searched for the key and for any 12-character piece of it. The CLI runs through
tests/fake_encoder.py, so the vectors come from the hash encoder instead of MiniLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fake_encoder import CLI as RECAUG_CLI
from recaug.pipelines.engines.http_engine import _ERROR_BODY_CHARS
from shop_data import Shop

KEY_ENV = "RECAUG_TEST_API_KEY"


class Stub(BaseHTTPRequestHandler):
    """/v1/chat/completions; how a request is answered depends on a hash of its messages and on how
    often the same messages were sent before (so retries of a failed request can succeed)."""

    attempts: Counter = Counter()
    served: Counter = Counter()
    authorizations: set = set()
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # the stub is quiet
        pass

    def _send(self, status: int, body: str, content_type: str = "application/json", headers: dict | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    @staticmethod
    def straddling(prefix: str, auth: str, cut: int) -> str:
        """An error text whose echoed header starts a few characters before position `cut`."""
        head = f"{prefix} request headers: "
        pad = max(0, cut - len(head) - len("Authorization: ") - 20)
        return head + "." * pad + f"Authorization: {auth}; X-Trace: 7f3a"

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        digest = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()
        d = int(digest[:8], 16)
        with self.lock:
            self.attempts[digest] += 1
            n = self.attempts[digest]
            self.authorizations.add(auth)
        if d % 13 == 3:  # a final 4xx: the request ends in the dead-letter table with the error text
            kind = "401"
            self._send(401, json.dumps({"error": {"message": self.straddling("invalid key", auth, _ERROR_BODY_CHARS)}}))
        elif d % 6 == 0 and n == 1:  # rate limited, echoing every header
            kind = "429"
            self._send(429, json.dumps({"error": "slow down", "echo": dict(self.headers)}), headers={"Retry-After": "0"})
        elif d % 6 == 1 and n <= 2:  # twice a server error whose long body cuts through the key
            kind = "500"
            self._send(500, self.straddling("upstream failed", auth, _ERROR_BODY_CHARS))
        elif d % 6 == 2 and n == 1:  # a proxy's HTML page with status 200: not JSON, retried
            kind = "html"
            self._send(200, self.straddling("<html><body>gateway", auth, 80), content_type="text/html")
        else:
            kind = "ok"
            # six different words: one word eight times over is a loop, which the text checks reject
            words = " ".join(random.Random(d).sample(["warm", "quiet", "bold", "classic", "crime", "space"], 6))
            self._send(200, json.dumps({
                "id": digest[:12], "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Stub answer {digest[:6]}: {words}."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 10},
            }))
        with self.lock:
            self.served[kind] += 1


@pytest.fixture
def stub_server():
    Stub.attempts, Stub.served, Stub.authorizations = Counter(), Counter(), set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# 30 users, 20 items, 10 ratings each, in the shop's own column names
SHOP = Shop(n_users=30, n_items=20, per_user=10, seed=3, first_age=20, first_year=1990, title="Film {i}",
            genres=("Action", "Drama|Comedy"))


def write_shop(folder: Path) -> None:
    SHOP.write(folder)


def texts_of(path: Path) -> list[str]:
    """What a file can reveal: its raw bytes, and for Parquet every string value and the metadata."""
    raw = path.read_bytes()
    out = [raw.decode("latin-1")]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        out.append(str(table.schema.metadata or {}))
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                out.append("\n".join(v for v in column.to_pylist() if v is not None))
            elif pa.types.is_nested(column.type) or pa.types.is_dictionary(column.type):
                out.append(json.dumps(column.to_pylist(), default=str))
    return out


def pieces(key: str, width: int = 12) -> list[str]:
    return [key[i : i + width] for i in range(len(key) - width + 1)]


def test_the_api_key_appears_in_no_file_and_no_output(tmp_path, stub_server):
    key = "sk-" + secrets.token_hex(24)
    write_shop(tmp_path / "data")
    data = tmp_path / "data"
    config = tmp_path / "shop.yaml"
    config.write_text(yaml.safe_dump({
        "name": "shop",
        "workdir": str(tmp_path / "work"),
        "dataset": SHOP.dataset(data),
        "engine": {"kind": "http", "base_url": stub_server, "model": "stub-model", "api_key_env": KEY_ENV,
                   "http_retries": 3, "concurrency": 4, "timeout_s": 30},
        "runner": {"shard_size": 8},
        "augmenters": [{"name": "kar_user_preference"}, {"name": "kar_item_knowledge"},
                       # JSON answers expected: the stub's text is retried once, then dead-lettered with the prompt
                       {"name": "llmrec_implicit_feedback", "max_entities": 4}],
        # the stub's final 401s dead-letter a few entities on purpose
        "output_gate": {"min_coverage": 0.6, "max_dead_letter_share": 0.4},
    }, sort_keys=False))

    env = {**os.environ, KEY_ENV: key, "PYTHONUNBUFFERED": "1"}
    outputs = []
    for argv in (["run", str(config), "--no-progress"],  # generates; retries; dead-letters the 401s
                 ["run", str(config), "--no-progress"],  # cache hits; the 401s are tried again
                 ["preview", str(config), "kar_item_knowledge", "-n", "6"],
                 ["snapshots", "show", str(config), "--json"]):
        proc = subprocess.run([*RECAUG_CLI, *argv], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, f"{argv}:\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        outputs.append((argv[0], proc.stdout + proc.stderr))
    for i, (verb, text) in enumerate(outputs):
        (tmp_path / f"output-{i}-{verb}.txt").write_text(text)

    # the test did what it says: the key was sent, and every failure kind, echo included, was served
    assert Stub.authorizations == {f"Bearer {key}"}
    assert {"401", "429", "500", "html", "ok"} <= set(Stub.served), Stub.served
    logged = outputs[0][1]
    assert "retrying" in logged and "[REDACTED]" in logged
    dead = pl.concat([pl.read_parquet(p) for p in (tmp_path / "work" / "snapshots").glob("*/dead_letter/*.parquet")])
    assert dead.filter(pl.col("reason").str.contains("HTTP 401")).height > 0

    searched, found = 0, []
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        if path.is_relative_to(tmp_path / "data"):
            continue
        searched += 1
        for text in texts_of(path):
            hits = [piece for piece in pieces(key) if piece in text]
            if hits:
                found.append(f"{path.relative_to(tmp_path)}: {hits[0]!r}")
                break
    assert searched > 20
    assert found == [], "the API key (or a piece of it) was written to:\n" + "\n".join(found)


@pytest.mark.parametrize("where", ["query", "userinfo"])
def test_a_key_in_the_base_url_is_refused_before_anything_is_written(tmp_path, capsys, where):
    """engine.base_url is recorded in manifests and error messages, so a key inside it would leak."""
    from recaug.pipelines import cli

    key = "sk-" + secrets.token_hex(24)
    url = f"http://127.0.0.1:9/v1?api_key={key}" if where == "query" else f"http://user:{key}@127.0.0.1:9/v1"
    write_shop(tmp_path / "data")
    data = tmp_path / "data"
    config = tmp_path / "shop.yaml"
    config.write_text(yaml.safe_dump({
        "name": "shop", "workdir": str(tmp_path / "work"),
        "dataset": SHOP.dataset(data),
        "engine": {"kind": "http", "base_url": url},
        "augmenters": [{"name": "kar_item_knowledge"}],
    }))
    assert cli.main(["run", str(config)]) == 2
    captured = capsys.readouterr()
    assert "engine.base_url carries a credential" in captured.err and "api_key_env" in captured.err
    assert not any(piece in captured.out + captured.err for piece in pieces(key))
    assert not (tmp_path / "work").exists()
