"""CORS (`create_app(cors_origins=...)`, `jaxllm serve --cors-origin`) through Flask's test client.

The app runs over the session's tiny engine (conftest.py) with an API key, as a server that lets
another origin's chat UI call it would.
"""

import pytest

from jaxllm.cli import build_parser
from jaxllm.errors import InputError
from jaxllm.serve import create_app
from jaxllm.serve.cors import normalize_origin

KEY = "cors-key"
UI = "https://chat.example.com"
LOCAL_UI = "http://localhost:3000"
CORS_HEADERS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Headers", "Access-Control-Allow-Methods")


@pytest.fixture(scope="module")
def client(serve_engine):
    return create_app(serve_engine, api_key=KEY, cors_origins=[UI + "/", "HTTP://LOCALHOST:3000"]).test_client()


def preflight(client, path, origin, method="POST"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip


@pytest.mark.parametrize("origin", [UI, LOCAL_UI])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/models"])
def test_a_preflight_from_a_listed_origin_is_answered_without_the_key(client, origin, path):
    r = preflight(client, path, origin)
    assert r.status_code == 204 and r.data == b""
    assert r.headers["Access-Control-Allow-Origin"] == origin  # the matching origin, never "*"
    assert r.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert "Origin" in r.headers["Vary"]


def test_responses_to_a_listed_origin_carry_the_headers_errors_included(client):
    auth = {"Authorization": f"Bearer {KEY}", "Origin": UI}
    r = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3}, headers=auth)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == UI
    r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, "stream": True}, headers=auth)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == UI
    assert r.get_data().endswith(b"data: [DONE]\n\n")
    # the page on the other origin can read why it failed: a wrong key, a bad body
    r = client.get("/v1/models", headers={"Origin": UI})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == UI
    assert r.json["error"]["code"] == "invalid_api_key"
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}, headers=auth)
    assert r.status_code == 400 and r.headers["Access-Control-Allow-Origin"] == UI


@pytest.mark.parametrize("origin", ["https://evil.example", "http://chat.example.com", "https://chat.example.com:8443",
                                    "null", None])  # fmt: skip
def test_other_origins_get_no_cors_headers_and_no_preflight_pass(client, origin):
    headers = {"Access-Control-Request-Method": "POST", **({"Origin": origin} if origin else {})}
    r = client.options("/v1/chat/completions", headers=headers)
    assert r.status_code == 401  # no preflight answer: the key is still required, as without CORS
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}", **({"Origin": origin} if origin else {})})
    assert r.status_code == 200
    for response in (r, client.options("/v1/models", headers=headers)):
        assert not [h for h in CORS_HEADERS if h in response.headers]


def test_a_listed_origin_still_needs_the_key_for_the_real_request(client):
    r = client.post("/v1/chat/completions", json={"messages": []}, headers={"Origin": UI})
    assert r.status_code == 401


def test_without_cors_origins_nothing_changes(serve_engine):
    plain = create_app(serve_engine, api_key=KEY).test_client()
    r = preflight(plain, "/v1/completions", UI)
    assert r.status_code == 401 and "Access-Control-Allow-Origin" not in r.headers
    r = plain.get("/v1/models", headers={"Authorization": f"Bearer {KEY}", "Origin": UI})
    assert r.status_code == 200 and not [h for h in CORS_HEADERS if h in r.headers]


def test_only_the_api_gets_cors_headers(client):
    assert "Access-Control-Allow-Origin" not in preflight(client, "/", UI).headers
    for path in ("/", "/health", "/ready"):
        assert not [h for h in CORS_HEADERS if h in client.get(path, headers={"Origin": UI}).headers]


@pytest.mark.parametrize(("given", "want"), [
    ("https://chat.example.com/", "https://chat.example.com"), ("HTTP://LocalHost:3000", "http://localhost:3000"),
    ("https://a.example:443", "https://a.example"), ("http://[::1]:8080", "http://[::1]:8080"),
])  # fmt: skip
def test_origins_are_normalized_as_browsers_send_them(given, want):
    assert normalize_origin(given) == want


@pytest.mark.parametrize("bad", ["*", "chat.example.com", "https://chat.example.com/ui", "ftp://x.example", "", "null"])
def test_a_bad_origin_is_an_input_error_naming_the_flag(bad):
    with pytest.raises(InputError, match="--cors-origin"):
        normalize_origin(bad)


def test_the_cli_flag_is_repeatable():
    args = build_parser().parse_args(["serve", "--checkpoint", "ck", "--cors-origin", UI, "--cors-origin", LOCAL_UI])
    assert args.cors_origin == [UI, LOCAL_UI]
