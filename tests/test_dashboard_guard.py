"""The dashboard's guards in isolation: rate-limit buckets, origins, hosts (tests/security/ has
the attacks against a real server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from dashboard.app import create_app
from dashboard.auth import Authenticator, ManagerDirectory, form_post_is_own, origin_matches_site
from dashboard.guard import SiteSecurity, host_allowed, host_name, split_list
from teamtrack.backends import from_url
from teamtrack.netlimits import RateLimiter, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=6, clock=clock)
    assert [limiter.take("a") for _ in range(6)] == [0.0] * 6
    assert limiter.take("a") == 10.0  # one token every 10 s
    clock.now = 10.0
    assert limiter.take("a") == 0.0
    limiter.give_back("a")
    assert limiter.take("a") == 0.0
    assert limiter.take("b") == 0.0  # keys are apart


def test_limiter_state_is_bounded() -> None:
    limiter = RateLimiter(per_minute=1, max_keys=100)
    for index in range(10_000):
        limiter.take(f"name-{index}")
    assert len(limiter) == 100
    assert RateLimiter(per_minute=0).take("x") == 0.0  # off


def test_address_keys() -> None:
    assert address_key("203.0.113.9") == "203.0.113.9"
    assert address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2:ffff::1")
    assert address_key("::ffff:203.0.113.9") == "203.0.113.9"
    assert address_key(None) == "?"


def test_origins_compare_scheme_host_and_port() -> None:
    site = {"host": "maps.example.org"}
    assert origin_matches_site({**site, "origin": "https://maps.example.org"}, "wss")
    assert origin_matches_site({**site, "origin": "https://maps.example.org:443"}, "wss")
    assert not origin_matches_site({**site, "origin": "http://maps.example.org"}, "wss")
    assert not origin_matches_site({**site, "origin": "https://maps.example.org:8443"}, "wss")
    assert not origin_matches_site({**site, "origin": "null"}, "ws")
    assert origin_matches_site(site, "ws")  # not a browser
    assert form_post_is_own({**site, "referer": "https://maps.example.org/login"}, "https")
    assert not form_post_is_own({**site, "referer": "https://evil.example/x"}, "https")
    assert form_post_is_own(site, "https")


def test_host_names_and_patterns() -> None:
    assert host_name("[::1]:8000") == "::1"
    assert host_name("Maps.Example.org.:443") == "maps.example.org"
    allowed = split_list("localhost, 127.0.0.1,::1,*.example.org")
    for good in ("localhost:8000", "127.0.0.1", "[::1]:80", "maps.example.org"):
        assert host_allowed(good, allowed), good
    for bad in ("example.org", "evil.example", "", None, "127.0.0.1.evil.example"):
        assert not host_allowed(bad, allowed), bad
    assert host_allowed("anything", ("*",))


def test_in_process_app_with_site_settings() -> None:
    directory = ManagerDirectory.from_records([])
    app = create_app(
        from_url("memory://"),
        Authenticator(directory, "secret", 3600),
        instance_id="test",
        registry=CollectorRegistry(),
        site=SiteSecurity(allowed_hosts=("testserver",), metrics_token="m-token"),
    )
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400
        assert client.get("/metrics").status_code == 404
        scraped = client.get("/metrics", headers={"Authorization": "Bearer m-token"})
        assert scraped.status_code == 200
        assert scraped.headers["x-content-type-options"] == "nosniff"
