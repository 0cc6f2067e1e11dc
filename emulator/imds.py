"""EC2 Instance Metadata Service (IMDSv2) emulator for one emulated instance.

Each ImdsEmulator serves real HTTP on 127.0.0.1 with a port the OS chooses,
so code on the emulated instance (including botocore) talks to it through
AWS_EC2_METADATA_SERVICE_ENDPOINT. Only IMDSv2 is served: every GET needs a
session token from PUT /latest/api/token. The control plane publishes Spot
notices and injects faults over time windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

logger = logging.getLogger("spotrun.emulator.imds")

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MIN_TOKEN_TTL_S = 1
MAX_TOKEN_TTL_S = 21600

# IMDS refreshes role credentials well before they expire. This emulator
# calls the credentials source again once fewer than 5 minutes remain.
CREDENTIAL_REFRESH_MARGIN = timedelta(minutes=5)

SPOT_ACTIONS = frozenset({"terminate", "stop", "hibernate"})

# Faults that last for a time window. "token-expiry" acts once, at once.
WINDOWED_FAULTS = frozenset(
    {"unauthorized", "token-hang", "refused", "server-error", "throttle", "slow"}
)
FAULT_KINDS = WINDOWED_FAULTS | {"token-expiry"}

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_META = "/latest/meta-data"
_CREDENTIALS_LISTING = _META + "/iam/security-credentials"
_INSTANCE_ACTION_PATH = _META + "/spot/instance-action"
_REBALANCE_PATH = _META + "/events/recommendations/rebalance"
_IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"
_USER_DATA_PATH = "/latest/user-data"


@dataclass(frozen=True)
class InstanceDescription:
    """Static facts about the emulated instance that IMDS reports."""

    instance_id: str
    instance_type: str
    ami_id: str
    availability_zone: str
    region: str
    private_ip: str
    role_name: str | None
    user_data: bytes | None
    account_id: str
    architecture: str = "x86_64"


@dataclass(frozen=True)
class RoleCredentials:
    """Temporary credentials of the instance role, as STS issues them."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime

    @classmethod
    def from_sts(cls, credentials: Mapping[str, object]) -> RoleCredentials:
        """Build from the Credentials member of an STS AssumeRole response."""
        expiration = credentials["Expiration"]
        if isinstance(expiration, str):
            expiration = datetime.fromisoformat(expiration)
        if not isinstance(expiration, datetime):
            raise TypeError(f"Expiration must be a datetime or ISO 8601 string, got {expiration!r}")
        return cls(
            access_key_id=str(credentials["AccessKeyId"]),
            secret_access_key=str(credentials["SecretAccessKey"]),
            session_token=str(credentials["SessionToken"]),
            expiration=expiration,
        )


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator received. status is None when no response was sent."""

    method: str
    path: str
    status: int | None


@dataclass(frozen=True)
class _Fault:
    until: float  # time.monotonic() value at which the window ends
    delay_s: float = 0.0


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"datetime must be timezone-aware, got naive {moment!r}")
    return moment.astimezone(timezone.utc).strftime(_TIME_FORMAT)


def _text(status: int, text: str, *headers: tuple[str, str]) -> _Response:
    return _Response(status, text.encode("utf-8"), headers)


def _json(document: Mapping[str, object]) -> _Response:
    return _text(200, json.dumps(document, indent=2))


_NOT_FOUND = _text(404, "Not Found")
_UNAUTHORIZED = _text(401, "Unauthorized")


class _ImdsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: ImdsEmulator) -> None:
        self.emulator = emulator
        super().__init__(address, _ImdsRequestHandler)


class _ImdsRequestHandler(BaseHTTPRequestHandler):
    server_version = "EC2ws"
    sys_version = ""
    server: _ImdsHttpServer

    def do_GET(self) -> None:
        self.server.emulator._serve(self)

    do_PUT = do_POST = do_DELETE = do_PATCH = do_GET

    def log_message(self, format: str, *args: object) -> None:
        # The emulator keeps its own request log, so stderr stays quiet.
        pass


class ImdsEmulator:
    """IMDSv2 endpoint of one emulated EC2 instance, served on 127.0.0.1.

    credentials_source is called (with no arguments) to obtain the role
    credentials, normally from the emulated STS. It is required when the
    instance has a role.
    """

    def __init__(
        self,
        instance: InstanceDescription,
        credentials_source: Callable[[], RoleCredentials] | None = None,
    ) -> None:
        if instance.role_name is not None and credentials_source is None:
            raise ValueError(
                f"instance {instance.instance_id} has role {instance.role_name!r} "
                "but no credentials_source was given"
            )
        self.instance = instance
        self._credentials_source = credentials_source
        self._launch_time = datetime.now(timezone.utc)

        self._lock = threading.Lock()
        self._credentials_lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _ImdsHttpServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._reopen_timer: threading.Timer | None = None

        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._faults: dict[str, _Fault] = {}
        self._instance_action: bytes | None = None
        self._rebalance: bytes | None = None
        self._credentials: RoleCredentials | None = None
        self._credentials_updated: datetime | None = None
        self._log: list[RequestRecord] = []

    # Lifecycle

    def start(self) -> str:
        """Start serving and return the base URL, such as http://127.0.0.1:PORT."""
        with self._lock:
            if self._port is not None:
                raise RuntimeError(f"IMDS emulator for {self.instance.instance_id} is already started")
            self._stopping.clear()
            self._open(0)
            return self.base_url

    def stop(self) -> None:
        """Stop serving and wake any request held by a fault. Safe to call twice."""
        self._stopping.set()
        with self._lock:
            if self._reopen_timer is not None:
                self._reopen_timer.cancel()
                self._reopen_timer = None
            self._close()
            self._port = None

    def __enter__(self) -> ImdsEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError(f"IMDS emulator for {self.instance.instance_id} is not started")
        return f"http://127.0.0.1:{self._port}"

    def _open(self, port: int) -> None:
        server = _ImdsHttpServer(("127.0.0.1", port), self)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"imds-{self.instance.instance_id}",
            daemon=True,
        )
        thread.start()
        self._server = server
        self._thread = thread
        self._port = server.server_address[1]

    def _close(self) -> None:
        # Must not run on a request handler thread: shutdown() waits for the
        # serve_forever loop, which would then wait for this handler.
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def _reopen(self) -> None:
        with self._lock:
            self._reopen_timer = None
            self._faults.pop("refused", None)
            if self._stopping.is_set() or self._port is None or self._server is not None:
                return
            try:
                self._open(self._port)
            except OSError:
                # NOTE: another process may have taken the port while it was
                # closed. The emulator then stays closed until stop().
                logger.exception(
                    "IMDS emulator for %s failed to reopen port %d after the 'refused' fault window",
                    self.instance.instance_id,
                    self._port,
                )

    # Control plane

    def publish_instance_action(self, action: str = "terminate", at: datetime | None = None) -> None:
        """Publish a Spot interruption notice. at defaults to 2 minutes from now."""
        if action not in SPOT_ACTIONS:
            raise ValueError(f"invalid Spot action {action!r}, expected one of {sorted(SPOT_ACTIONS)}")
        if at is None:
            at = datetime.now(timezone.utc) + timedelta(minutes=2)
        payload = json.dumps({"action": action, "time": _format_time(at)})
        with self._lock:
            self._instance_action = payload.encode("utf-8")

    def publish_rebalance_recommendation(self, at: datetime | None = None) -> None:
        """Publish a rebalance recommendation. at defaults to now."""
        if at is None:
            at = datetime.now(timezone.utc)
        payload = json.dumps({"noticeTime": _format_time(at)})
        with self._lock:
            self._rebalance = payload.encode("utf-8")

    def clear_notices(self) -> None:
        """Withdraw the interruption notice and the rebalance recommendation."""
        with self._lock:
            self._instance_action = None
            self._rebalance = None

    def inject_fault(
        self,
        kind: str,
        duration_s: float | None = None,
        *,
        delay_s: float | None = None,
    ) -> None:
        """Inject a fault for duration_s seconds from now.

        Kinds:
        - "unauthorized": 401 on every request, token requests included.
        - "token-expiry": invalidate every issued token once, at once. It takes no duration_s.
        - "token-hang": token PUTs get no response until the window ends, then the connection closes.
        - "refused": the listening socket is closed for the window, then reopened on the same port.
        - "server-error": 500 on every request.
        - "throttle": 429 on every request.
        - "slow": each response is delayed by delay_s seconds.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}, expected one of {sorted(FAULT_KINDS)}")
        if (delay_s is not None) != (kind == "slow"):
            raise ValueError(f"delay_s is required for 'slow' and invalid for {kind!r}")
        if delay_s is not None and delay_s <= 0:
            raise ValueError(f"delay_s must be positive, got {delay_s}")

        if kind == "token-expiry":
            if duration_s is not None:
                raise ValueError("'token-expiry' acts once and takes no duration_s")
            with self._lock:
                self._tokens.clear()
            return

        if duration_s is None or duration_s <= 0:
            raise ValueError(f"duration_s must be positive for {kind!r}, got {duration_s}")
        fault = _Fault(until=time.monotonic() + duration_s, delay_s=delay_s or 0.0)
        with self._lock:
            if self._port is None:
                raise RuntimeError(f"IMDS emulator for {self.instance.instance_id} is not started")
            self._faults[kind] = fault
            if kind == "refused":
                self._close_for_window(duration_s)

    def _close_for_window(self, duration_s: float) -> None:
        if self._reopen_timer is not None:
            self._reopen_timer.cancel()
        self._close()
        timer = threading.Timer(duration_s, self._reopen)
        timer.daemon = True
        timer.start()
        self._reopen_timer = timer

    def clear_faults(self) -> None:
        """End every fault window now, reopening the port if it was closed."""
        with self._lock:
            self._faults.clear()
            timer = self._reopen_timer
        if timer is not None:
            timer.cancel()
            self._reopen()

    def request_log(self) -> list[RequestRecord]:
        """Return a copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_request_log(self) -> None:
        with self._lock:
            self._log.clear()

    # Request handling

    def _active_faults(self) -> dict[str, _Fault]:
        now = time.monotonic()
        with self._lock:
            return {kind: fault for kind, fault in self._faults.items() if fault.until > now}

    def _serve(self, handler: _ImdsRequestHandler) -> None:
        method = handler.command
        path = urlsplit(handler.path).path
        faults = self._active_faults()

        slow = faults.get("slow")
        if slow is not None:
            self._stopping.wait(slow.delay_s)

        hang = faults.get("token-hang")
        if hang is not None and method == "PUT" and path == TOKEN_PATH:
            # This mimics a PUT response dropped by the hop limit, so the
            # client gets no response. The connection closes when the window ends.
            self._record(method, path, None)
            self._stopping.wait(max(0.0, hang.until - time.monotonic()))
            handler.close_connection = True
            return

        response = self._respond(handler, method, path, faults)
        # Recorded before sending, so a client that has its response can
        # already see the request in the log.
        self._record(method, path, response.status)
        try:
            handler.send_response(response.status)
            handler.send_header("Content-Type", "text/plain")
            handler.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers:
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError) as error:
            # Expected under the "slow" fault: the client timed out and left.
            logger.debug(
                "IMDS emulator for %s could not send %d for %s %s: %s",
                self.instance.instance_id,
                response.status,
                method,
                path,
                error,
            )
            handler.close_connection = True

    def _record(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self._log.append(RequestRecord(method, path, status))

    def _respond(
        self,
        handler: _ImdsRequestHandler,
        method: str,
        path: str,
        faults: Mapping[str, _Fault],
    ) -> _Response:
        if "unauthorized" in faults:
            return _UNAUTHORIZED
        if "server-error" in faults:
            return _text(500, "Internal Server Error")
        if "throttle" in faults:
            return _text(429, "Too Many Requests")

        if path == TOKEN_PATH:
            if method != "PUT":
                return _text(405, "Method Not Allowed", ("Allow", "PUT"))
            return self._issue_token(handler)
        if method != "GET":
            return _text(405, "Method Not Allowed", ("Allow", "GET"))
        if not self._token_is_valid(handler.headers.get(TOKEN_HEADER)):
            return _UNAUTHORIZED
        return self._route_get(path)

    def _issue_token(self, handler: _ImdsRequestHandler) -> _Response:
        # EC2 rejects token requests that passed through a proxy.
        if handler.headers.get("X-Forwarded-For") is not None:
            return _text(403, "Forbidden")
        ttl_header = handler.headers.get(TOKEN_TTL_HEADER)
        try:
            ttl_s = int(ttl_header) if ttl_header is not None else None
        except ValueError:
            ttl_s = None
        if ttl_s is None or not MIN_TOKEN_TTL_S <= ttl_s <= MAX_TOKEN_TTL_S:
            return _text(400, "Bad Request")

        token = secrets.token_urlsafe(42)
        now = time.monotonic()
        with self._lock:
            self._tokens = {known: expiry for known, expiry in self._tokens.items() if expiry > now}
            self._tokens[token] = now + ttl_s
        return _text(200, token, (TOKEN_TTL_HEADER, str(ttl_s)))

    def _token_is_valid(self, token: str | None) -> bool:
        if token is None:
            return False
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def _route_get(self, path: str) -> _Response:
        # Leaf paths are served with or without a trailing slash, because
        # botocore requests "placement/availability-zone/".
        key = path.rstrip("/")
        instance = self.instance

        leaves = {
            _META + "/instance-id": instance.instance_id,
            _META + "/instance-type": instance.instance_type,
            _META + "/ami-id": instance.ami_id,
            _META + "/placement/availability-zone": instance.availability_zone,
            _META + "/placement/region": instance.region,
            _META + "/local-ipv4": instance.private_ip,
        }
        if key in leaves:
            return _text(200, leaves[key])

        if key == _USER_DATA_PATH:
            if instance.user_data is None:
                return _NOT_FOUND
            return _Response(200, instance.user_data)
        if key == _IDENTITY_DOCUMENT_PATH:
            return _json(self._identity_document())
        if key == _INSTANCE_ACTION_PATH:
            return self._notice(self._instance_action)
        if key == _REBALANCE_PATH:
            return self._notice(self._rebalance)
        if key.startswith(_META + "/iam/"):
            return self._route_iam(key)
        return _NOT_FOUND

    def _notice(self, payload: bytes | None) -> _Response:
        if payload is None:
            return _NOT_FOUND
        return _Response(200, payload)

    def _route_iam(self, key: str) -> _Response:
        role = self.instance.role_name
        if role is None:
            return _NOT_FOUND
        if key == _META + "/iam/info":
            return _json(self._iam_info())
        if key == _CREDENTIALS_LISTING:
            return _text(200, role)
        if key == f"{_CREDENTIALS_LISTING}/{role}":
            return self._credentials_response()
        return _NOT_FOUND

    def _identity_document(self) -> dict[str, object]:
        instance = self.instance
        return {
            "accountId": instance.account_id,
            "architecture": instance.architecture,
            "availabilityZone": instance.availability_zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": instance.ami_id,
            "instanceId": instance.instance_id,
            "instanceType": instance.instance_type,
            "kernelId": None,
            "pendingTime": _format_time(self._launch_time),
            "privateIp": instance.private_ip,
            "ramdiskId": None,
            "region": instance.region,
            "version": "2017-09-30",
        }

    def _iam_info(self) -> dict[str, object]:
        role = self.instance.role_name
        account = self.instance.account_id
        digest = hashlib.sha256(f"{account}/{role}".encode()).hexdigest().upper()
        return {
            "Code": "Success",
            "LastUpdated": _format_time(self._launch_time),
            "InstanceProfileArn": f"arn:aws:iam::{account}:instance-profile/{role}",
            "InstanceProfileId": "AIPA" + digest[:17],
        }

    def _credentials_response(self) -> _Response:
        try:
            credentials, updated = self._current_credentials()
        except Exception:
            logger.exception(
                "credentials source failed for role %s of instance %s",
                self.instance.role_name,
                self.instance.instance_id,
            )
            return _text(500, "Internal Server Error")
        return _json(
            {
                "Code": "Success",
                "LastUpdated": _format_time(updated),
                "Type": "AWS-HMAC",
                "AccessKeyId": credentials.access_key_id,
                "SecretAccessKey": credentials.secret_access_key,
                "Token": credentials.session_token,
                "Expiration": _format_time(credentials.expiration),
            }
        )

    def _current_credentials(self) -> tuple[RoleCredentials, datetime]:
        assert self._credentials_source is not None
        now = datetime.now(timezone.utc)
        # Held across the source call so concurrent requests fetch only once.
        with self._credentials_lock:
            cached = self._credentials
            updated = self._credentials_updated
            if cached is not None and updated is not None:
                if now < cached.expiration - CREDENTIAL_REFRESH_MARGIN:
                    return cached, updated

            fresh = self._credentials_source()
            if fresh.expiration.tzinfo is None:
                raise ValueError(f"credentials expiration must be timezone-aware, got {fresh.expiration!r}")
            self._credentials = fresh
            self._credentials_updated = now
            return fresh, now
