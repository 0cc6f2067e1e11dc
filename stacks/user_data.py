"""User-data of a training instance: fetch the code bundle, run the supervisor, shut down.

The script reads three optional environment variables so that the local cloud can run
the very same script on a development machine: SPOTRUN_ROOT (working folder),
SPOTRUN_PYTHON (interpreter) and SPOTRUN_SHUTDOWN_COMMAND (what "power off" means).
On EC2 none of them is set and the defaults apply.
"""

from __future__ import annotations

CONFIG_DELIMITER = "SPOTRUN_RUN_CONFIG"

_TEMPLATE = """#!/bin/bash
# spotrun instance start-up. However the script ends, its EXIT trap powers the instance
# off, and the launch template turns an instance-initiated shutdown into a termination.
set -uo pipefail
trap '${{SPOTRUN_SHUTDOWN_COMMAND:-shutdown -h now}}' EXIT
export SPOTRUN_ROOT="${{SPOTRUN_ROOT:-/opt/spotrun}}"
export SPOTRUN_PYTHON="${{SPOTRUN_PYTHON:-{python}}}"
mkdir -p "$SPOTRUN_ROOT"
cd "$SPOTRUN_ROOT" || exit 1

cat > run-config.json <<'{delimiter}'
{config_json}
{delimiter}

# IMDSv2 must return a token before anything else can work, because the AWS CLI and
# the supervisor get the role's credentials from it.
check_imds() {{
  local endpoint="${{AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254/}}"
  for attempt in 1 2 3; do
    local url="${{endpoint%/}}/latest/api/token"
    if curl -sf -m 3 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$url" >/dev/null
    then
      return 0
    fi
    sleep 2
  done
  echo "spotrun: the instance metadata service at $endpoint did not answer a token" >&2
  echo "spotrun: request; check the launch template's MetadataOptions: HttpEndpoint" >&2
  echo "spotrun: enabled, HttpTokens, HttpPutResponseHopLimit (1 on the host, 2 in" >&2
  echo "spotrun: containers)" >&2
  return 1
}}

fetch_code() {{
  for attempt in 1 2 3 4 5; do
    if aws s3 cp --only-show-errors --region '{region}' '{code_uri}' code.zip; then
      return 0
    fi
    echo "spotrun: code bundle download failed (attempt $attempt of 5)" >&2
    sleep $((attempt * 3))
  done
  return 1
}}

# The AMI's Python brings PyTorch; boto3 and watchtower are added only when missing.
if ! "$SPOTRUN_PYTHON" -c 'import boto3, watchtower' 2>/dev/null; then
  "$SPOTRUN_PYTHON" -m pip install --quiet 'boto3>=1.34' 'watchtower==3.4.0' ||
    echo "spotrun: could not install boto3/watchtower; logs stay on the instance" >&2
fi

if check_imds && fetch_code && rm -rf code && "$SPOTRUN_PYTHON" -m zipfile -e code.zip code; then
  (cd code && "$SPOTRUN_PYTHON" -m bootstrap --config ../run-config.json)
  echo "spotrun: supervisor exited with code $?"
else
  echo "spotrun: could not fetch or unpack the code bundle {code_uri}" >&2
fi
"""


def render_user_data(*, config_json: str, code_uri: str, region: str, python: str) -> str:
    """Return the user-data script; arguments may contain CloudFormation tokens."""
    return _TEMPLATE.format(config_json=config_json, code_uri=code_uri, region=region,
                            python=python, delimiter=CONFIG_DELIMITER)
