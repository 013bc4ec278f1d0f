"""`edgellama serve --api-key`, the served model's name and the exposure warning: a tiny
random model behind a real server on a free loopback port, driven by the real `openai`
client (and http.client for what the client will not send)."""

from __future__ import annotations

import http.client
import json
import os

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import tiny_model_of_layout  # noqa: E402
from edgellama.deploy.bundle import pack  # noqa: E402
from edgellama.runtime.contract import KVLayout  # noqa: E402
from edgellama.runtime.model import Model  # noqa: E402
from edgellama.serve import ServeError, default_model_id, exposure_warning  # noqa: E402
from edgellama.serve.app import create_app  # noqa: E402
from edgellama.serve.server import Server, bind  # noqa: E402

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
KEY = "sk-edgellama-test-0123456789"
HI = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    return tiny_model_of_layout(tmp_path_factory, KVLayout.SHARED)


@pytest.fixture(scope="module")
def server(model):
    srv = Server(model, bind("127.0.0.1", 0), max_concurrent=1, log_level="warning", cache_bytes=0,
                 api_key=KEY).start()
    yield srv
    srv.stop()


NO_AUTH = {"extra_headers": {"Authorization": openai.Omit()}}  # a request without the header at all


def client(server, api_key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def raw(server, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, dict(r.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def assert_no_key(body: dict) -> None:
    error = body["error"]
    assert error["message"].startswith("You didn't provide an API key.")
    assert "Authorization: Bearer" in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)
    assert set(error) == {"message", "type", "param", "code"}


def assert_wrong_key(body: dict, sent: str) -> None:
    error = body["error"]
    assert error["message"].startswith("Incorrect API key provided")
    assert sent not in error["message"]  # the key is never echoed
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")
    assert set(error) == {"message", "type", "param", "code"}


# --- the key ------------------------------------------------------------------------------------


def test_right_key_is_served(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [server.model_id]
    assert c.models.retrieve(server.model_id).id == server.model_id
    kw = dict(model=server.model_id, messages=HI, temperature=0, max_tokens=4)
    whole = c.chat.completions.create(**kw)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert c.completions.create(model=server.model_id, prompt="The quick", temperature=0, max_tokens=3).choices


@pytest.mark.parametrize("stream", [False, True])
def test_no_key_is_401(server, stream):
    c = client(server)
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model=server.model_id, messages=HI, max_tokens=2, stream=stream, **NO_AUTH)
    assert info.value.status_code == 401
    assert_no_key(info.value.response.json())
    assert info.value.body == info.value.response.json()["error"]  # the client unwraps "error"
    assert info.value.code is None and info.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        c.models.list(**NO_AUTH)
    assert server.engine.stats()["running"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_wrong_key_is_401(server, stream):
    c = client(server, api_key="sk-wrong-key")
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model=server.model_id, messages=HI, max_tokens=2, stream=stream)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert_wrong_key(info.value.response.json(), "sk-wrong-key")
    with pytest.raises(openai.AuthenticationError):
        c.models.retrieve(server.model_id)
    with pytest.raises(openai.AuthenticationError):
        c.completions.create(model=server.model_id, prompt="x", max_tokens=1, stream=stream)


@pytest.mark.parametrize("headers, expect", [
    ({}, "none"),
    ({"Authorization": ""}, "none"),
    ({"Authorization": "Bearer"}, "none"),
    ({"Authorization": "Bearer   "}, "none"),
    ({"Authorization": f"Basic {KEY}"}, "none"),  # only Bearer carries a key
    ({"Authorization": f"Bearer {KEY}x"}, "wrong"),
    ({"Authorization": f"Bearer {KEY[:-1]}"}, "wrong"),
    ({"Authorization": f"Bearer {KEY.upper()}"}, "wrong"),
    ({"Authorization": f"Bearer {KEY}"}, "ok"),
    ({"Authorization": f"bearer  {KEY} "}, "ok"),  # the scheme is case-insensitive (RFC 9110)
])
def test_header_forms(server, headers, expect):
    status, got, body = raw(server, "GET", "/v1/models", headers)
    if expect == "ok":
        assert status == 200 and body["data"][0]["id"] == server.model_id
        return
    assert status == 401 and got.get("WWW-Authenticate", got.get("www-authenticate")) == "Bearer"
    (assert_no_key if expect == "none" else lambda b: assert_wrong_key(b, KEY))(body)


def test_health_and_options_need_no_key(server):
    status, _, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == server.model_id
    status, _, body = raw(server, "GET", "/health", {"Authorization": "Bearer wrong"})
    assert status == 200
    status, _, body = raw(server, "OPTIONS", "/v1/chat/completions")  # as without a key: no such method
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


def test_every_other_path_needs_the_key(server):
    for method, path in [("GET", "/v1/nothing"), ("POST", "/v1/chat/completions"), ("GET", "/"),
                         ("POST", "/health")]:
        status, _, body = raw(server, method, path, body=b"{}" if method == "POST" else None)
        if path == "/health":  # open path, wrong method: routing answers, as without a key
            assert status == 405
        else:
            assert status == 401, path
            assert_no_key(body)
    # with the key, the same requests reach the routes
    status, _, body = raw(server, "GET", "/v1/nothing", {"Authorization": f"Bearer {KEY}"})
    assert status == 404 and body["error"]["code"] == "not_found"


def test_unusable_keys_are_refused(model):
    for bad in ["", " ", "two words", "tab\tkey", "clé"]:
        with pytest.raises(ServeError, match="API key"):
            create_app(model, api_key=bad)


# --- the model's name ---------------------------------------------------------------------------


def test_default_model_id(tmp_path, monkeypatch):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (tmp_path / "x.edgellama").write_bytes(b"zip")
    (tmp_path / "plain").write_bytes(b"zip")
    assert default_model_id(folder) == default_model_id(f"{folder}/") == "smollm2-135m"
    assert default_model_id(tmp_path / "x.edgellama") == "x"
    assert default_model_id(str(tmp_path / "plain")) == "plain"
    monkeypatch.chdir(folder)
    assert default_model_id(".") == "smollm2-135m"
    assert default_model_id("./") == "smollm2-135m"
    assert default_model_id("..") == tmp_path.name


def test_bundle_is_served_under_its_stem_and_a_name_wins(model, tmp_path):
    bundle = tmp_path / "tiny-chat.edgellama"
    pack(model.folder, bundle)
    packed = Model.load(bundle, threads=1)
    srv = Server(packed, bind("127.0.0.1", 0), max_concurrent=1, log_level="warning", cache_bytes=0).start()
    try:
        assert srv.model_id == "tiny-chat"
        c = client(srv, api_key="anything")  # no key set: any key or none is accepted
        assert [m.id for m in c.models.list().data] == ["tiny-chat"]
        assert c.chat.completions.create(model="tiny-chat", messages=HI, max_tokens=2,
                                         **NO_AUTH).model == "tiny-chat"
    finally:
        srv.stop()
    app = create_app(packed, model_id="mine", cache_bytes=0)
    try:
        assert app.state.model_id == "mine"
    finally:
        app.state.engine.close()
    app = create_app(model, cache_bytes=0)  # a folder: its name
    try:
        assert app.state.model_id == model.folder.name
    finally:
        app.state.engine.close()


# --- the warning --------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::1", "[::1]",
                                  "::ffff:127.0.0.1"])
def test_no_warning_on_loopback(host):
    assert exposure_warning(host, None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "fe80::1", "example.com",
                                  "my-laptop", ""])
def test_warning_beyond_loopback_without_key(host):
    warning = exposure_warning(host, None)
    assert warning is not None and "\n" not in warning and warning.startswith("warning: ")
    assert "--api-key" in warning and "EDGELLAMA_API_KEY" in warning
    assert exposure_warning(host, KEY) is None


def test_warning_text():
    assert exposure_warning("0.0.0.0", None) == (
        "warning: serving on 0.0.0.0 without --api-key: anyone who can reach this port can use the model; "
        "set --api-key or EDGELLAMA_API_KEY")
