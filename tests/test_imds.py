"""IMDS emulator and client tested together over real HTTP on loopback."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import InstanceMetadataFetcher

from bootstrap.imds import (
    ENDPOINT_ENV_VAR,
    ImdsClient,
    ImdsError,
    ImdsUnavailableError,
    InstanceIdentity,
    NoticeWatcher,
    RebalanceRecommendation,
    SpotInstanceAction,
)
from emulator.imds import (
    ImdsEmulator,
    InstanceDescription,
    RequestRecord,
    RoleCredentials,
)

ROLE = "spotrun-trainer"
USER_DATA = b"#!/bin/bash\necho spotrun\n"
INSTANCE = InstanceDescription(
    instance_id="i-0123456789abcdef0",
    instance_type="g5.xlarge",
    ami_id="ami-0abcdef1234567890",
    availability_zone="us-east-1b",
    region="us-east-1",
    private_ip="10.0.1.23",
    role_name=ROLE,
    user_data=USER_DATA,
    account_id="123456789012",
)


class CredentialsSource:
    """Stand-in for the emulated STS that counts calls and issues distinct keys."""

    def __init__(self, lifetime: timedelta = timedelta(hours=1)) -> None:
        self.lifetime = lifetime
        self.calls = 0
        self.issued: list[RoleCredentials] = []

    def __call__(self) -> RoleCredentials:
        self.calls += 1
        credentials = RoleCredentials(
            access_key_id=f"ASIAEMULATED{self.calls:08d}",
            secret_access_key=f"secret-{self.calls}",
            session_token=f"session-token-{self.calls}",
            expiration=datetime.now(timezone.utc) + self.lifetime,
        )
        self.issued.append(credentials)
        return credentials


@pytest.fixture
def credentials_source() -> CredentialsSource:
    return CredentialsSource()


@pytest.fixture
def emulator(credentials_source: CredentialsSource) -> Iterator[ImdsEmulator]:
    with ImdsEmulator(INSTANCE, credentials_source) as running:
        yield running


def make_client(emulator: ImdsEmulator, **overrides: object) -> ImdsClient:
    settings: dict[str, object] = {
        "connect_timeout_s": 0.5,
        "read_timeout_s": 0.5,
        "max_attempts": 4,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.4,
    }
    settings.update(overrides)
    return ImdsClient(emulator.base_url, **settings)  # type: ignore[arg-type]


def raw_request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def raw_token(emulator: ImdsEmulator, ttl_s: int = 60) -> str:
    status, body = raw_request(
        emulator.base_url + "/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl_s)},
    )
    assert status == 200
    return body.decode()


def statuses(emulator: ImdsEmulator, method: str, path: str) -> list[int | None]:
    return [
        record.status
        for record in emulator.request_log()
        if record.method == method and record.path == path
    ]


# Emulator protocol checks, with a plain HTTP client


def test_emulator_get_without_token_is_401(emulator: ImdsEmulator) -> None:
    status, _ = raw_request(emulator.base_url + "/latest/meta-data/instance-id")

    assert status == 401
    assert emulator.request_log() == [RequestRecord("GET", "/latest/meta-data/instance-id", 401)]


def test_emulator_get_with_unknown_token_is_401(emulator: ImdsEmulator) -> None:
    status, _ = raw_request(
        emulator.base_url + "/latest/meta-data/instance-id",
        headers={"X-aws-ec2-metadata-token": "not-a-token"},
    )

    assert status == 401


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "abc"])
def test_emulator_token_ttl_invalid_is_400(emulator: ImdsEmulator, ttl: str | None) -> None:
    headers = {} if ttl is None else {"X-aws-ec2-metadata-token-ttl-seconds": ttl}

    status, _ = raw_request(emulator.base_url + "/latest/api/token", method="PUT", headers=headers)

    assert status == 400


def test_emulator_token_ttl_bounds_accepted(emulator: ImdsEmulator) -> None:
    for ttl in ("1", "21600"):
        status, _ = raw_request(
            emulator.base_url + "/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl},
        )
        assert status == 200, ttl


def test_emulator_token_with_forwarded_for_is_403(emulator: ImdsEmulator) -> None:
    status, _ = raw_request(
        emulator.base_url + "/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "203.0.113.7"},
    )

    assert status == 403


def test_emulator_token_expires_after_ttl(emulator: ImdsEmulator) -> None:
    token = raw_token(emulator, ttl_s=1)
    url = emulator.base_url + "/latest/meta-data/instance-id"
    headers = {"X-aws-ec2-metadata-token": token}

    assert raw_request(url, headers=headers)[0] == 200
    time.sleep(1.1)
    assert raw_request(url, headers=headers)[0] == 401


def test_emulator_wrong_methods_are_405(emulator: ImdsEmulator) -> None:
    token_url = emulator.base_url + "/latest/api/token"

    assert raw_request(token_url)[0] == 405
    assert raw_request(emulator.base_url + "/latest/meta-data/instance-id", method="POST")[0] == 405


def test_emulator_iam_info_and_listing(emulator: ImdsEmulator) -> None:
    headers = {"X-aws-ec2-metadata-token": raw_token(emulator)}

    listing_url = emulator.base_url + "/latest/meta-data/iam/security-credentials/"
    status, listing = raw_request(listing_url, headers=headers)
    assert status == 200
    assert listing.decode() == ROLE

    status, info = raw_request(emulator.base_url + "/latest/meta-data/iam/info", headers=headers)
    assert status == 200
    document = json.loads(info)
    assert document["Code"] == "Success"
    assert document["InstanceProfileArn"] == f"arn:aws:iam::123456789012:instance-profile/{ROLE}"


def test_emulator_credentials_document_shape(
    emulator: ImdsEmulator, credentials_source: CredentialsSource
) -> None:
    headers = {"X-aws-ec2-metadata-token": raw_token(emulator)}

    status, body = raw_request(
        emulator.base_url + f"/latest/meta-data/iam/security-credentials/{ROLE}", headers=headers
    )

    assert status == 200
    document = json.loads(body)
    issued = credentials_source.issued[0]
    assert document["Code"] == "Success"
    assert document["Type"] == "AWS-HMAC"
    assert document["AccessKeyId"] == issued.access_key_id
    assert document["SecretAccessKey"] == issued.secret_access_key
    assert document["Token"] == issued.session_token
    assert document["Expiration"] == issued.expiration.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert datetime.strptime(document["LastUpdated"], "%Y-%m-%dT%H:%M:%SZ")


def test_emulator_unknown_role_is_404(emulator: ImdsEmulator) -> None:
    headers = {"X-aws-ec2-metadata-token": raw_token(emulator)}

    other_role_url = emulator.base_url + "/latest/meta-data/iam/security-credentials/other"
    status, _ = raw_request(other_role_url, headers=headers)

    assert status == 404


def test_emulator_invalid_control_input_raises(emulator: ImdsEmulator) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        emulator.inject_fault("meltdown", 1.0)
    with pytest.raises(ValueError, match="delay_s"):
        emulator.inject_fault("slow", 1.0)
    with pytest.raises(ValueError, match="duration_s"):
        emulator.inject_fault("throttle", 0)
    with pytest.raises(ValueError, match="invalid Spot action"):
        emulator.publish_instance_action("reboot")
    with pytest.raises(ValueError, match="timezone-aware"):
        emulator.publish_rebalance_recommendation(datetime(2026, 12, 4, 20, 0))


def test_emulator_role_without_source_rejected() -> None:
    with pytest.raises(ValueError, match="credentials_source"):
        ImdsEmulator(INSTANCE)


# Client against the emulator


def test_client_reads_metadata(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)

    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id
    assert client.get("latest/meta-data/instance-type") == INSTANCE.instance_type
    assert client.get("/latest/meta-data/ami-id") == INSTANCE.ami_id
    assert client.get("/latest/meta-data/placement/availability-zone") == INSTANCE.availability_zone
    assert client.get("/latest/meta-data/placement/region") == INSTANCE.region
    assert client.get("/latest/meta-data/local-ipv4") == INSTANCE.private_ip
    assert client.user_data() == USER_DATA
    assert client.instance_identity() == InstanceIdentity(
        instance_id=INSTANCE.instance_id,
        instance_type=INSTANCE.instance_type,
        availability_zone=INSTANCE.availability_zone,
        region=INSTANCE.region,
        ami_id=INSTANCE.ami_id,
        private_ip=INSTANCE.private_ip,
    )

    # One token serves every request.
    assert statuses(emulator, "PUT", "/latest/api/token") == [200]


def test_client_404_returns_none(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)

    assert client.get("/latest/meta-data/no-such-key") is None
    assert client.instance_action() is None
    assert client.rebalance_recommendation() is None


def test_client_user_data_absent_is_none() -> None:
    bare = InstanceDescription(
        instance_id="i-0fedcba9876543210",
        instance_type="c5.large",
        ami_id="ami-0abcdef1234567890",
        availability_zone="us-west-2a",
        region="us-west-2",
        private_ip="10.0.2.5",
        role_name=None,
        user_data=None,
        account_id="123456789012",
    )
    with ImdsEmulator(bare) as emulator:
        client = make_client(emulator)

        assert client.user_data() is None
        assert client.get("/latest/meta-data/iam/security-credentials/") is None


def test_client_uses_endpoint_env_var(emulator: ImdsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV_VAR, emulator.base_url + "/")

    client = ImdsClient(connect_timeout_s=0.5, read_timeout_s=0.5)

    assert client.base_url == emulator.base_url + "/"
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id


def test_client_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV_VAR, raising=False)

    assert ImdsClient().base_url == "http://169.254.169.254/"


def test_client_401_renews_token_once(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id
    emulator.clear_request_log()

    emulator.inject_fault("token-expiry")

    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id
    assert emulator.request_log() == [
        RequestRecord("GET", "/latest/meta-data/instance-id", 401),
        RequestRecord("PUT", "/latest/api/token", 200),
        RequestRecord("GET", "/latest/meta-data/instance-id", 200),
    ]


def test_client_refreshes_token_before_expiry(emulator: ImdsEmulator) -> None:
    client = make_client(emulator, token_ttl_s=1)
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id

    # Past 80% of the 1 s TTL but before expiry: the client must renew first.
    time.sleep(0.85)

    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id
    assert statuses(emulator, "PUT", "/latest/api/token") == [200, 200]
    assert 401 not in statuses(emulator, "GET", "/latest/meta-data/instance-id")


def test_client_unauthorized_window_raises_401(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)
    emulator.inject_fault("unauthorized", 2.0)

    with pytest.raises(ImdsError) as raised:
        client.get("/latest/meta-data/instance-id")

    assert raised.value.status == 401
    # The cached-token GET got 401, then the new token request got 401 too.
    assert statuses(emulator, "PUT", "/latest/api/token") == [401]


@pytest.mark.parametrize(("kind", "status"), [("server-error", 500), ("throttle", 429)])
def test_client_retries_then_succeeds(
    emulator: ImdsEmulator, caplog: pytest.LogCaptureFixture, kind: str, status: int
) -> None:
    client = make_client(emulator, max_attempts=8, backoff_base_s=0.1, backoff_max_s=0.4)
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id
    emulator.inject_fault(kind, 0.3)

    with caplog.at_level(logging.WARNING, logger="spotrun.imds"):
        assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id

    seen = statuses(emulator, "GET", "/latest/meta-data/instance-id")
    assert seen[0] == 200
    assert seen[1] == status
    assert seen[-1] == 200
    retries = [record for record in caplog.records if record.name == "spotrun.imds"]
    assert len(retries) == seen.count(status)
    assert "/latest/meta-data/instance-id" in retries[0].getMessage()
    assert f"HTTP {status}" in retries[0].getMessage()
    assert "attempts left: 7" in retries[0].getMessage()


def test_client_throttle_beyond_budget_raises(emulator: ImdsEmulator) -> None:
    client = make_client(emulator, max_attempts=3)
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id
    emulator.inject_fault("throttle", 5.0)

    started = time.monotonic()
    with pytest.raises(ImdsError) as raised:
        client.get("/latest/meta-data/instance-id")
    elapsed = time.monotonic() - started

    assert raised.value.status == 429
    assert "after 3 attempts" in str(raised.value)
    assert statuses(emulator, "GET", "/latest/meta-data/instance-id")[1:] == [429, 429, 429]
    assert elapsed < 1.0


def test_client_slow_responses_time_out(emulator: ImdsEmulator) -> None:
    client = make_client(emulator, read_timeout_s=0.2, max_attempts=2)
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id
    emulator.inject_fault("slow", 3.0, delay_s=1.0)

    started = time.monotonic()
    with pytest.raises(ImdsError) as raised:
        client.get("/latest/meta-data/instance-id")
    elapsed = time.monotonic() - started

    assert raised.value.status is None
    assert "read timed out after 0.2 s" in str(raised.value)
    assert elapsed < 1.0


def test_client_slow_within_timeout_succeeds(emulator: ImdsEmulator) -> None:
    client = make_client(emulator, read_timeout_s=1.0)
    emulator.inject_fault("slow", 2.0, delay_s=0.2)

    started = time.monotonic()
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id

    # Token PUT and GET are both delayed.
    assert time.monotonic() - started >= 0.4


def test_check_reachable_ok(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)

    client.check_reachable()

    assert statuses(emulator, "PUT", "/latest/api/token") == [200]


def test_check_reachable_refused_raises_quickly(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)
    emulator.inject_fault("refused", 3.0)

    started = time.monotonic()
    with pytest.raises(ImdsUnavailableError) as raised:
        client.check_reachable()
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert "connection refused" in message
    assert "HttpPutResponseHopLimit" in message
    assert "HttpEndpoint" in message
    assert elapsed < 1.0
    assert emulator.request_log() == []


def test_check_reachable_token_hang_raises(emulator: ImdsEmulator) -> None:
    client = make_client(emulator, read_timeout_s=0.3)
    emulator.inject_fault("token-hang", 3.0)

    started = time.monotonic()
    with pytest.raises(ImdsUnavailableError) as raised:
        client.check_reachable(attempts=2)
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert "read timed out after 0.3 s" in message
    assert "HttpPutResponseHopLimit" in message
    assert 0.6 <= elapsed < 2.0


def test_check_reachable_unauthorized_raises(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)
    emulator.inject_fault("unauthorized", 2.0)

    with pytest.raises(ImdsUnavailableError) as raised:
        client.check_reachable()

    assert raised.value.status == 401
    assert "HttpTokens" in str(raised.value)


def test_refused_window_reopens_same_port(emulator: ImdsEmulator) -> None:
    client = make_client(emulator, max_attempts=1)
    base_url = emulator.base_url
    emulator.inject_fault("refused", 0.4)

    with pytest.raises(ImdsError, match="connection refused"):
        client.get("/latest/meta-data/instance-id")

    time.sleep(0.6)
    assert emulator.base_url == base_url
    assert client.get("/latest/meta-data/instance-id") == INSTANCE.instance_id


def test_botocore_provider_gets_role_credentials(
    emulator: ImdsEmulator, credentials_source: CredentialsSource
) -> None:
    fetcher = InstanceMetadataFetcher(base_url=emulator.base_url, timeout=2, num_attempts=1)

    credentials = InstanceMetadataProvider(iam_role_fetcher=fetcher).load()

    assert credentials is not None
    frozen = credentials.get_frozen_credentials()
    issued = credentials_source.issued[0]
    assert frozen.access_key == issued.access_key_id
    assert frozen.secret_key == issued.secret_access_key
    assert frozen.token == issued.session_token
    assert statuses(emulator, "PUT", "/latest/api/token") == [200]


def test_role_credentials_cached_until_near_expiry() -> None:
    source = CredentialsSource(lifetime=timedelta(hours=1))
    with ImdsEmulator(INSTANCE, source) as emulator:
        client = make_client(emulator)
        path = f"/latest/meta-data/iam/security-credentials/{ROLE}"

        first = json.loads(client.get(path) or "")
        second = json.loads(client.get(path) or "")

        assert source.calls == 1
        assert first["AccessKeyId"] == second["AccessKeyId"]

    short_lived = CredentialsSource(lifetime=timedelta(minutes=4))
    with ImdsEmulator(INSTANCE, short_lived) as emulator:
        client = make_client(emulator)

        first = json.loads(client.get(path) or "")
        second = json.loads(client.get(path) or "")

        # Each fetch is within 5 minutes of Expiration, so each one refreshes.
        assert short_lived.calls == 2
        assert first["AccessKeyId"] != second["AccessKeyId"]


def test_instance_action_parsed(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)
    at = datetime(2026, 12, 4, 20, 10, tzinfo=timezone.utc)

    emulator.publish_instance_action("stop", at)
    notice = client.instance_action()

    assert isinstance(notice, SpotInstanceAction)
    assert notice.action == "stop"
    assert notice.time == at
    assert notice.time.tzinfo is not None
    assert len(notice.identity) == 64


def test_rebalance_recommendation_parsed(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)
    at = datetime(2026, 12, 4, 20, 5, tzinfo=timezone.utc)

    emulator.publish_rebalance_recommendation(at)
    notice = client.rebalance_recommendation()

    assert isinstance(notice, RebalanceRecommendation)
    assert notice.notice_time == at


def test_clear_notices_returns_404(emulator: ImdsEmulator) -> None:
    client = make_client(emulator)
    emulator.publish_instance_action()
    emulator.publish_rebalance_recommendation()

    emulator.clear_notices()

    assert client.instance_action() is None
    assert client.rebalance_recommendation() is None


def test_notice_watcher_returns_each_notice_once(emulator: ImdsEmulator) -> None:
    watcher = NoticeWatcher(make_client(emulator))
    at = datetime(2026, 12, 4, 20, 10, tzinfo=timezone.utc)

    assert watcher.poll() == []
    emulator.publish_rebalance_recommendation(at - timedelta(minutes=5))
    emulator.publish_instance_action("terminate", at)

    first = watcher.poll()
    assert [type(notice) for notice in first] == [SpotInstanceAction, RebalanceRecommendation]
    assert watcher.poll() == []
    assert watcher.poll() == []

    emulator.publish_instance_action("terminate", at + timedelta(minutes=1))
    later = watcher.poll()
    assert len(later) == 1
    assert isinstance(later[0], SpotInstanceAction)
    assert later[0].time == at + timedelta(minutes=1)


def test_notice_during_fault_seen_after(emulator: ImdsEmulator) -> None:
    watcher = NoticeWatcher(make_client(emulator, max_attempts=2))
    emulator.inject_fault("server-error", 0.5)
    emulator.publish_instance_action("terminate")

    with pytest.raises(ImdsError) as raised:
        watcher.poll()
    assert raised.value.status == 500

    time.sleep(0.6)
    notices = watcher.poll()
    assert len(notices) == 1
    assert isinstance(notices[0], SpotInstanceAction)
    assert notices[0].action == "terminate"


def test_notice_during_refused_window_seen_after(emulator: ImdsEmulator) -> None:
    watcher = NoticeWatcher(make_client(emulator, max_attempts=1))
    emulator.inject_fault("refused", 0.4)
    emulator.publish_rebalance_recommendation()

    with pytest.raises(ImdsError):
        watcher.poll()

    time.sleep(0.6)
    notices = watcher.poll()
    assert len(notices) == 1
    assert isinstance(notices[0], RebalanceRecommendation)


# Malformed payloads come from a stub server, since the emulator only
# publishes well-formed notices.


class _MalformedNoticeHandler(BaseHTTPRequestHandler):
    def do_PUT(self) -> None:
        self._reply(b"stub-token")

    def do_GET(self) -> None:
        self._reply(b'{"action": "terminate", "time": ')

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_malformed_notice_raises_naming_path() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MalformedNoticeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = ImdsClient(f"http://127.0.0.1:{server.server_address[1]}/", read_timeout_s=1.0)

        with pytest.raises(ImdsError, match="malformed JSON") as raised:
            client.instance_action()

        assert raised.value.path == "/latest/meta-data/spot/instance-action"
        assert "/latest/meta-data/spot/instance-action" in str(raised.value)
    finally:
        server.shutdown()
        server.server_close()
