"""The local HTTP test server: ranges, HEAD, counters and injected faults."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request

import pytest

from tileseg.testing.http import Faults, serve_directory


@pytest.fixture
def root(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 4)
    return tmp_path


def get(url, rng=None, method="GET"):
    req = urllib.request.Request(url, method=method, headers={"Range": rng} if rng else {})
    with urllib.request.urlopen(req) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_ranges_head_and_counters(root):
    with serve_directory(str(root)) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        status, headers, body = get(srv.url("a.bin"), "bytes=10-19")
        assert status == 206 and body == bytes(range(10, 20)) and headers["Content-Range"] == "bytes 10-19/1024"
        status, _, body = get(srv.url("a.bin"), "bytes=-4")
        assert status == 206 and body == bytes(range(252, 256))
        status, _, body = get(srv.url("a.bin"))
        assert status == 200 and len(body) == 1024
        status, headers, body = get(srv.url("a.bin"), method="HEAD")
        assert headers["Content-Length"] == "1024" and headers["Accept-Ranges"] == "bytes" and body == b""
        stats = srv.stats.snapshot()
    assert stats["get"] == 3 and stats["head"] == 1 and stats["bytes"] == 10 + 4 + 1024
    assert stats["ranges"][0] == ("/a.bin", 10, 20)


def test_404_and_dropped_connection(root):
    with serve_directory(str(root), Faults(missing={"/a.bin"})) as srv:
        for name in ("a.bin", "missing.bin", "../etc/passwd"):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                get(srv.url(name))
        srv.faults.missing.clear()
        srv.faults.drop_first_gets = 1
        with pytest.raises((http.client.IncompleteRead, ConnectionError, urllib.error.URLError)):
            get(srv.url("a.bin"), "bytes=0-99")
        assert get(srv.url("a.bin"), "bytes=0-99")[2] == bytes(range(100))
        with pytest.raises(urllib.error.HTTPError, match="416"):
            get(srv.url("a.bin"), "bytes=5000-6000")
