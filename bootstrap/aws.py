"""AWS clients for the instance: botocore's standard retry mode, with retries logged.

Credentials come from botocore's default chain, which on EC2 ends at the instance
metadata service (the instance role). Nothing here reads keys from anywhere else.
"""

from __future__ import annotations

import logging

import boto3
from botocore.config import Config

MAX_ATTEMPTS = 8

# botocore's "standard" retry mode retries throttling errors, HTTP 5xx, connection
# errors and timeouts, with jittered exponential backoff; 8 attempts span about 20 s.
RETRY_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
    connect_timeout=5,
    read_timeout=30,
)

# Error codes the standard mode treats as transient, besides any HTTP 5xx response.
RETRYABLE_ERROR_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
    "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException",
})

log = logging.getLogger("spotrun.aws")


def _log_retryable_failure(attempts: int, operation, response=None, caught_exception=None,
                           **_ignored) -> None:
    """Log a failed attempt that botocore's standard mode will retry.

    Registered on ``needs-retry``; it returns None so the retry decision stays botocore's.
    """
    if caught_exception is not None:
        cause = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None:
        http, parsed = response
        code = parsed.get("Error", {}).get("Code", "")
        if http.status_code < 500 and code not in RETRYABLE_ERROR_CODES:
            return
        cause = f"HTTP {http.status_code} {code}".strip()
    else:
        return
    if attempts < MAX_ATTEMPTS:
        log.warning("%s attempt %d of %d failed (%s); retrying", operation.name, attempts,
                    MAX_ATTEMPTS, cause)
    else:
        log.error("%s failed after %d attempts (%s)", operation.name, attempts, cause)


def make_session(region: str) -> boto3.Session:
    return boto3.Session(region_name=region)


def client(session: boto3.Session, service: str):
    """Return a client with standard retries that logs each retried failure."""
    service_client = session.client(service, config=RETRY_CONFIG)
    service_client.meta.events.register("needs-retry", _log_retryable_failure)
    return service_client
