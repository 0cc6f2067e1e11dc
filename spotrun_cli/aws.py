"""AWS sessions for the command line, and the one-line messages for AWS errors.

Credentials, region and endpoint come from boto3's usual sources: AWS_PROFILE,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL and the shared
config files. The local cloud is an AWS endpoint on a loopback address.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSOError,
    TokenRetrievalError,
)

EXIT_FAILED = 1
EXIT_USAGE = 2

# Three attempts keep an unreachable endpoint to a few seconds of retries.
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 3},
                       connect_timeout=5, read_timeout=30)

CREDENTIAL_ERROR_CODES = frozenset({
    "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
    "ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId", "AuthFailure",
    "RequestExpired",
})
ACCESS_DENIED_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
    "UnauthorizedException",
})


class CliError(Exception):
    """An error that the command line prints as one line before exiting with exit_code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Aws:
    """A boto3 session and its clients, created once per service."""

    def __init__(self, profile: str | None = None, region: str | None = None) -> None:
        try:
            self.session = boto3.Session(profile_name=profile, region_name=region)
        except ProfileNotFound as error:
            raise CliError(f"AWS profile {error.kwargs.get('profile')!r} not found; set "
                           f"AWS_PROFILE or --profile to a profile in ~/.aws/config") from None
        self._clients: dict[str, object] = {}

    @property
    def region(self) -> str | None:
        return self.session.region_name

    def client(self, service: str):
        if service not in self._clients:
            if not self.session.region_name:
                raise CliError("no AWS region set; set AWS_REGION (for example "
                               "us-east-1) or pass --region")
            self._clients[service] = self.session.client(service, config=CLIENT_CONFIG)
        return self._clients[service]

    def is_local_cloud(self) -> bool:
        """Return whether requests go to an endpoint on a loopback address."""
        return is_loopback_url(self.client("s3").meta.endpoint_url)


def is_loopback_url(url: str | None) -> bool:
    host = urlparse(url or "").hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def describe_aws_error(error: Exception) -> CliError | None:
    """Return the one-line CliError for a boto3 or botocore error, or None for others."""
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return CliError("no AWS credentials found; set AWS_PROFILE, or AWS_ACCESS_KEY_ID "
                        "and AWS_SECRET_ACCESS_KEY, or run `aws configure`")
    if isinstance(error, (SSOError, TokenRetrievalError)):
        return CliError(f"AWS SSO credentials could not be loaded ({error}); run "
                        f"`aws sso login`")
    if isinstance(error, NoRegionError):
        return CliError("no AWS region set; set AWS_REGION (for example us-east-1) or "
                        "pass --region")
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError,
                          ConnectionClosedError)):
        url = error.kwargs.get("endpoint_url", "")
        return CliError(f"could not connect to the AWS endpoint {url}; check "
                        f"AWS_ENDPOINT_URL, AWS_REGION and the network "
                        f"(is the local cloud running?)")
    if isinstance(error, ReadTimeoutError):
        url = error.kwargs.get("endpoint_url", "")
        return CliError(f"timed out waiting for the AWS endpoint {url}; try again",
                        EXIT_FAILED)
    if isinstance(error, ClientError):
        code = error_code(error)
        operation = error.operation_name
        message = error.response.get("Error", {}).get("Message", "")
        if code in CREDENTIAL_ERROR_CODES:
            return CliError(f"AWS rejected the credentials ({code} on {operation}); "
                            f"refresh them (`aws configure` or `aws sso login`) or check "
                            f"AWS_PROFILE")
        if code in ACCESS_DENIED_CODES:
            return CliError(f"access denied for {operation}: {message}; use an identity "
                            f"that may call it")
        return CliError(f"{operation} failed: {code}: {message}", EXIT_FAILED)
    if isinstance(error, BotoCoreError):
        return CliError(f"AWS request failed: {error}", EXIT_FAILED)
    return None
