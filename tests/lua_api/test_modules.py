"""Debian's Lua modules inside authd's states (lua_api.md §5.4, §7.2, trap 15).

Real scripts `require` C modules built for the system's liblua5.4 (cjson, LuaSocket,
LuaSec); they only load when lupa's Lua symbols are global and package.cpath points at
Debian's directories. These tests use the packages installed on this machine.
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from lua_api.results import PassdbResult
from lua_api.runtime import DEBIAN_PACKAGE_CPATH, DEBIAN_PACKAGE_PATH, StateOptions, run_in_loop
from tests.http_backend import Backend, HttpBackend
from tests.lua_api.conftest import request

pytestmark = pytest.mark.requires("lua-cjson")


async def test_default_package_paths(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script("p, c = package.path, package.cpath")
    g = script.state.lua.globals()
    assert g[b"p"].decode() == DEBIAN_PACKAGE_PATH.format(v="5.4")
    assert g[b"c"].decode() == DEBIAN_PACKAGE_CPATH.format(v="5.4")
    assert "/usr/share/lua/5.4/?.lua" in g[b"p"].decode()
    assert "/usr/lib/x86_64-linux-gnu/lua/5.4/?.so" in g[b"c"].decode()


async def test_cjson(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        """
        local cjson = require("cjson")
        function auth_passdb_lookup(req)
          local data = cjson.decode('{"password": "{PLAIN}s3cret", "quota": 1024, "tags": ["a", "b"]}')
          return dovecot.auth.PASSDB_RESULT_OK, {
            password = data.password, quota = data.quota, tags = table.concat(data.tags, ","),
            json = cjson.encode({user = req.user}),
          }
        end
        """
    )
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.code == PassdbResult.OK and result.password == b"{PLAIN}s3cret"
    assert dict(result.fields) == {b"quota": b"1024", b"tags": b"a,b", b"json": b'{"user":"alice"}'}


@pytest.mark.requires("lua-socket")
async def test_luasocket_http(load_script) -> None:  # type: ignore[no-untyped-def]
    # a blocking LuaSocket request from inside an entry point (holds its state, as in Dovecot)
    with HttpBackend(Backend(users={"alice": "x"})) as server:
        script = await load_script(
            f"""
            local socket = require("socket")
            local http = require("socket.http")
            function auth_passdb_lookup(req)
              local body, code = http.request("{server.url}/health")
              return dovecot.auth.PASSDB_RESULT_OK, {{
                body = body, code = code, v = socket._VERSION, t = math.type(socket.gettime()),
              }}
            end
            """
        )
        result = await script.passdb_lookup(request(), run_in_loop)
    fields = dict(result.fields)
    assert fields[b"body"] == b"ok" and fields[b"code"] == b"200" and fields[b"t"] == b"float"
    assert fields[b"v"].startswith(b"LuaSocket 3")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate; yields its URL."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.requires("lua-socket", "lua-sec", "openssl")
async def test_luasec_https(load_script, tls_server: str) -> None:  # type: ignore[no-untyped-def]
    # mailcow's passwd-verify.lua: ssl.https + ltn12 + cjson, certificate checks off
    script = await load_script(
        f"""
        local https = require("ssl.https")
        local ltn12 = require("ltn12")
        local cjson = require("cjson")
        local ssl = require("ssl")
        function auth_password_verify(req, pass)
          local body = {{}}
          local _, code = https.request{{
            url = "{tls_server}/verify", sink = ltn12.sink.table(body), verify = "none", protocol = "any",
          }}
          local answer = cjson.decode(table.concat(body))
          if code == 200 and answer.ok then
            return dovecot.auth.PASSDB_RESULT_OK, {{v = ssl._VERSION and "yes" or "no"}}
          end
          return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, "no"
        end
        """
    )
    result = await script.password_verify(request(), b"pw", run_in_loop)
    assert (result.code, result.fields) == (PassdbResult.OK, ((b"v", b"yes"),))


async def test_getenv_sees_only_imported_names(load_script, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setenv("API_TOKEN", "from-process")
    script = await load_script(
        "a, b, c = os.getenv('HOME'), os.getenv('API_TOKEN'), os.getenv('NOPE')",
        StateOptions(environment={"API_TOKEN": "imported"}),
    )
    g = script.state.lua.globals()
    assert (g[b"a"], g[b"b"], g[b"c"]) == (None, b"imported", None)
