"""IMDSv2 client that the supervisor uses on the instance (standard library only).

The endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT, the variable that
botocore reads too, so tests can point both at the loopback emulator.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

logger = logging.getLogger("spotrun.imds")

ENDPOINT_ENV_VAR = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254/"

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL_S = 21600

INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"
USER_DATA_PATH = "/latest/user-data"

LAUNCH_TEMPLATE_HINT = (
    "Check the launch template MetadataOptions. HttpEndpoint must be 'enabled'. "
    "HttpPutResponseHopLimit must be at least 1 for processes on the host and at "
    "least 2 inside containers, because the token PUT response is dropped beyond "
    "that many hops. HttpTokens may be 'required' or 'optional', since this client "
    "always uses IMDSv2 tokens."
)


class ImdsError(Exception):
    """A metadata request failed. status is the HTTP status, or None without a response."""

    def __init__(self, message: str, *, path: str, status: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.status = status


class ImdsUnavailableError(ImdsError):
    """IMDS could not be reached at start-up."""


class _TransientError(Exception):
    """A failure worth retrying: no response, 429 or 5xx. The message is the cause."""

    def __init__(self, cause: str, *, status: int | None = None) -> None:
        super().__init__(cause)
        self.status = status


@dataclass(frozen=True)
class InstanceIdentity:
    """Identity of the instance, from the instance identity document."""

    instance_id: str
    instance_type: str
    availability_zone: str
    region: str
    ami_id: str
    private_ip: str


@dataclass(frozen=True)
class SpotInstanceAction:
    """Spot interruption notice.

    action is "terminate", "stop" or "hibernate" in the EC2 documentation.
    The client passes any other string through unchanged.
    """

    action: str
    time: datetime
    identity: str  # SHA-256 of the raw payload, equal for repeats of one notice


@dataclass(frozen=True)
class RebalanceRecommendation:
    """EC2 rebalance recommendation: the instance is at elevated risk of interruption."""

    notice_time: datetime
    identity: str  # SHA-256 of the raw payload, equal for repeats of one notice


Notice = SpotInstanceAction | RebalanceRecommendation


class ImdsClient:
    """IMDSv2 client with a cached session token, timeouts and retries.

    Each request attempt has connect_timeout_s to connect and read_timeout_s
    for each socket read. 429, 5xx, connection errors and timeouts are
    retried with jittered exponential backoff, max_attempts attempts in all.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token_ttl_s: int = MAX_TOKEN_TTL_S,
        connect_timeout_s: float = 1.0,
        read_timeout_s: float = 2.0,
        max_attempts: int = 4,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 4.0,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get(ENDPOINT_ENV_VAR) or DEFAULT_ENDPOINT
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"invalid IMDS endpoint {base_url!r}: expected http://HOST[:PORT]/")
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be 1..{MAX_TOKEN_TTL_S}, got {token_ttl_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")

        self.base_url = base_url
        self._netloc = parts.netloc
        self._host = parts.hostname
        self._port = parts.port or 80
        self._path_prefix = parts.path.rstrip("/")
        self.token_ttl_s = token_ttl_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s

        self._token_lock = threading.Lock()
        self._token: str | None = None
        self._token_refresh_at = 0.0  # time.monotonic() value

    # Start-up check

    def check_reachable(self, attempts: int = 3, pause_s: float = 0.2) -> None:
        """Request a session token, raising ImdsUnavailableError if IMDS cannot be reached.

        Makes at most `attempts` token requests, so with the default timeouts
        this returns or raises within about 10 s.
        """
        url = self._url(TOKEN_PATH)
        cause = "no attempt made"
        for attempt in range(1, attempts + 1):
            try:
                with self._token_lock:
                    self._fetch_token()
                return
            except _TransientError as error:
                cause = str(error)
            except ImdsError as error:
                raise ImdsUnavailableError(
                    f"IMDS at {url} rejected the token request: {error}. {LAUNCH_TEMPLATE_HINT}",
                    path=TOKEN_PATH,
                    status=error.status,
                ) from error
            if attempt < attempts:
                time.sleep(pause_s)

        raise ImdsUnavailableError(
            f"IMDS at {url} is not reachable after {attempts} token requests: {cause}. "
            f"{LAUNCH_TEMPLATE_HINT}",
            path=TOKEN_PATH,
        )

    # Metadata reads

    def get(self, path: str) -> str | None:
        """Fetch a metadata path as text. Returns None for 404 and raises ImdsError otherwise."""
        body = self.get_bytes(path)
        if body is None:
            return None
        return body.decode("utf-8")

    def get_bytes(self, path: str) -> bytes | None:
        """Fetch a metadata path as bytes. Returns None for 404 and raises ImdsError otherwise."""
        path = "/" + path.lstrip("/")
        renewed_token = False
        attempt = 1
        while True:
            try:
                status, body = self._get_once(path)
            except _TransientError as error:
                self._back_off(path, attempt, error)
                attempt += 1
                continue

            if status == 401 and not renewed_token:
                # A token can be revoked before its TTL ends, so one 401 only
                # means the cached token must be replaced.
                logger.warning("IMDS GET %s returned 401; requesting a new token and retrying once", path)
                self._drop_token()
                renewed_token = True
                continue
            if status == 404:
                return None
            if 200 <= status < 300:
                return body
            raise ImdsError(f"IMDS GET {path} failed with HTTP {status}", path=path, status=status)

    def instance_identity(self) -> InstanceIdentity:
        """Fetch the instance identity document."""
        document = self._get_json(IDENTITY_DOCUMENT_PATH)
        try:
            return InstanceIdentity(
                instance_id=str(document["instanceId"]),
                instance_type=str(document["instanceType"]),
                availability_zone=str(document["availabilityZone"]),
                region=str(document["region"]),
                ami_id=str(document["imageId"]),
                private_ip=str(document["privateIp"]),
            )
        except KeyError as error:
            raise ImdsError(
                f"IMDS {IDENTITY_DOCUMENT_PATH} is missing field {error}", path=IDENTITY_DOCUMENT_PATH
            ) from error

    def user_data(self) -> bytes | None:
        """Fetch the user data, or None when the instance was launched without any."""
        return self.get_bytes(USER_DATA_PATH)

    def instance_action(self) -> SpotInstanceAction | None:
        """Fetch the Spot interruption notice, or None when there is none."""
        raw = self.get_bytes(INSTANCE_ACTION_PATH)
        # IMDS returns 404 for this path until EC2 schedules an interruption.
        if raw is None:
            return None
        payload = _parse_object(INSTANCE_ACTION_PATH, raw)
        action = payload.get("action")
        if not isinstance(action, str):
            raise ImdsError(
                f"IMDS {INSTANCE_ACTION_PATH} has no string 'action': {raw!r}",
                path=INSTANCE_ACTION_PATH,
            )
        return SpotInstanceAction(
            action=action,
            time=_parse_time(INSTANCE_ACTION_PATH, payload, "time"),
            identity=_identity(raw),
        )

    def rebalance_recommendation(self) -> RebalanceRecommendation | None:
        """Fetch the rebalance recommendation, or None when there is none."""
        raw = self.get_bytes(REBALANCE_PATH)
        if raw is None:
            return None
        payload = _parse_object(REBALANCE_PATH, raw)
        return RebalanceRecommendation(
            notice_time=_parse_time(REBALANCE_PATH, payload, "noticeTime"),
            identity=_identity(raw),
        )

    # Internals

    def _get_json(self, path: str) -> dict[str, object]:
        raw = self.get_bytes(path)
        if raw is None:
            raise ImdsError(f"IMDS {path} was not found (HTTP 404)", path=path, status=404)
        return _parse_object(path, raw)

    def _get_once(self, path: str) -> tuple[int, bytes]:
        token = self._current_token()
        return self._send("GET", path, {TOKEN_HEADER: token})

    def _back_off(self, path: str, attempt: int, error: _TransientError) -> None:
        attempts_left = self.max_attempts - attempt
        if attempts_left <= 0:
            raise ImdsError(
                f"IMDS GET {path} failed after {self.max_attempts} attempts: {error}",
                path=path,
                status=error.status,
            ) from error
        # Equal jitter: at least half of the exponential delay, so retries
        # always cover a minimum span of time.
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        delay_s = ceiling / 2 + random.uniform(0, ceiling / 2)
        logger.warning(
            "IMDS GET %s failed: %s; retrying in %.2f s (attempts left: %d)",
            path,
            error,
            delay_s,
            attempts_left,
        )
        time.sleep(delay_s)

    def _current_token(self) -> str:
        with self._token_lock:
            if self._token is None or time.monotonic() >= self._token_refresh_at:
                self._fetch_token()
            assert self._token is not None
            return self._token

    def _drop_token(self) -> None:
        with self._token_lock:
            self._token = None

    def _fetch_token(self) -> None:
        # Callers hold self._token_lock.
        requested_at = time.monotonic()
        # _send raises _TransientError for 429 and 5xx.
        status, body = self._send("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self.token_ttl_s)})
        if status != 200:
            raise ImdsError(
                f"IMDS token request (PUT {TOKEN_PATH}) failed with HTTP {status}",
                path=TOKEN_PATH,
                status=status,
            )
        self._token = body.decode("ascii").strip()
        # Refresh at 80% of the TTL, measured from before the request was
        # sent, so a token is not used in the last 20% of its lifetime.
        self._token_refresh_at = requested_at + 0.8 * self.token_ttl_s

    def _url(self, path: str) -> str:
        return f"http://{self._netloc}{self._path_prefix}{path}"

    def _send(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout_s)
        try:
            try:
                connection.connect()
            except TimeoutError as error:
                raise _TransientError(f"connect timed out after {self.connect_timeout_s} s") from error
            except ConnectionRefusedError as error:
                raise _TransientError("connection refused") from error
            except OSError as error:
                raise _TransientError(f"connect failed: {error}") from error

            assert connection.sock is not None
            # NOTE: the read timeout bounds each socket read, not the whole
            # response, so a server trickling bytes can take longer.
            connection.sock.settimeout(self.read_timeout_s)
            try:
                connection.request(method, self._path_prefix + path, headers=headers)
                response = connection.getresponse()
                body = response.read()
            except TimeoutError as error:
                raise _TransientError(f"read timed out after {self.read_timeout_s} s") from error
            except (OSError, http.client.HTTPException) as error:
                raise _TransientError(f"connection failed: {error!r}") from error
        finally:
            connection.close()

        if response.status == 429 or response.status >= 500:
            raise _TransientError(f"HTTP {response.status}", status=response.status)
        return response.status, body


class NoticeWatcher:
    """Polls for Spot notices and returns each notice only once."""

    def __init__(self, client: ImdsClient) -> None:
        self._client = client
        self._seen: set[str] = set()

    def poll(self) -> list[Notice]:
        """Fetch both notices and return those not returned before, instance action first.

        Raises ImdsError when either request fails. Nothing is marked as seen
        then, so the next poll returns the notice again.
        """
        candidates: list[Notice | None] = [
            self._client.instance_action(),
            self._client.rebalance_recommendation(),
        ]
        fresh: list[Notice] = []
        for notice in candidates:
            if notice is None or notice.identity in self._seen:
                continue
            self._seen.add(notice.identity)
            fresh.append(notice)
        return fresh


def _identity(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _parse_object(path: str, raw: bytes) -> dict[str, object]:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ImdsError(f"IMDS {path} returned malformed JSON ({error}): {raw[:200]!r}", path=path) from error
    if not isinstance(payload, dict):
        raise ImdsError(f"IMDS {path} returned JSON that is not an object: {raw[:200]!r}", path=path)
    return payload


def _parse_time(path: str, payload: dict[str, object], field: str) -> datetime:
    value = payload.get(field)
    if not isinstance(value, str):
        raise ImdsError(f"IMDS {path} has no string {field!r}: {payload!r}", path=path)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise ImdsError(f"IMDS {path} has an invalid {field!r} timestamp {value!r}", path=path) from error
    if moment.tzinfo is None:
        raise ImdsError(f"IMDS {path} has a {field!r} timestamp without a time zone: {value!r}", path=path)
    return moment
