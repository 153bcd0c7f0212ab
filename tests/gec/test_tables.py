"""`zhtune tables download` against a local HTTP server on loopback (no network), checked by sha256."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest

from zhtune.cli import main
from zhtune.gec.tables import FILES, find_tables


@pytest.fixture()
def server(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1; yield its URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_puts_checked_tables_where_score_finds_them(server, shared, tmp_path, monkeypatch, capsys):
    www, url = server
    for name in FILES:
        shutil.copy(shared / "data" / "cgec" / "cherrant_tables" / name, www / name)
    monkeypatch.setenv("ZHTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["tables", "download", "--url", url]) == 0
    assert find_tables() == tmp_path / "cache" / "cherrant_tables"
    for name in FILES:
        assert (tmp_path / "cache" / "cherrant_tables" / name).read_bytes() == (www / name).read_bytes()
    assert "ChERRANT tables in" in capsys.readouterr().out


def test_corrupted_download_is_refused_and_nothing_written(server, shared, tmp_path, capsys):
    www, url = server
    for name in FILES:
        data = (shared / "data" / "cgec" / "cherrant_tables" / name).read_bytes()
        (www / name).write_bytes(data[:-10] + b"0123456789" if name == "confusion_dict.txt" else data)
    dest = tmp_path / "dest"
    assert main(["tables", "download", "--url", url, "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "confusion_dict.txt: sha256" in err and "not the known-good" in err
    assert not (dest / "confusion_dict.txt").exists() and not list(dest.glob(".*tmp*"))


def test_missing_file_and_missing_tables_say_what_to_do(server, tmp_path, monkeypatch, capsys):
    _www, url = server
    assert main(["tables", "download", "--url", url, "--dest", str(tmp_path / "d")]) == 2
    assert "cannot download" in capsys.readouterr().err
    monkeypatch.setenv("ZHTUNE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("zhtune.gec.tables.candidate_dirs", lambda: [tmp_path / "nowhere"])
    hyp = tmp_path / "hyp.para"
    hyp.write_text("1\t我爱北京。\t我爱北京。\n", encoding="utf-8")
    assert main(["score", "--hyp", str(hyp), "--ref", str(hyp)]) == 2
    assert "run `zhtune tables download`" in capsys.readouterr().err
