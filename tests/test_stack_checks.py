"""Static checks of the synthesized stack: cdk-nag AwsSolutions, cfn-lint and checkov.

The app is built as app.py builds it (the AwsSolutions checks applied) for three
parameter sets: the defaults, an S3 data source with a fixed AMI and no kept bucket, and
every account-side option on. checkov 3.3.30 pins boto3 1.35.49 and networkx < 2.7,
which conflict with the project's pins, so `make setup` installs it into a virtual
environment of its own, .venv-checkov.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")

import aws_cdk as cdk  # noqa: E402
from aws_cdk.assertions import Annotations, Match  # noqa: E402

from stacks.config import RunParameters  # noqa: E402
from stacks.nag import apply_checks  # noqa: E402
from stacks.training_stack import TrainingStack  # noqa: E402

PARAMETER_SETS = {
    "defaults": RunParameters(),
    "s3-data": RunParameters(run_name="s3-data", data_source="s3://my-data-bucket/digits",
                             ami="ami-0123456789abcdef0", keep_bucket=False),
    "all-options": RunParameters(
        run_name="all-options", notification_email="ml-team@example.com", nodes=1,
        vpc_id="vpc-0123456789abcdef0", subnet_ids=("subnet-0123456789abcdef0",),
        on_demand_fallback=True, capacity_rebalance=True, fis_drill=True),
}
# A reason must explain why the finding is acceptable, not only restate the rule.
MIN_REASON_CHARS = 60
CFN_LINT_TIMEOUT_S = 300
# cfn-lint is installed into the same environment as the Python running the tests.
CFN_LINT = Path(sys.executable).parent / "cfn-lint"
CHECKOV = Path(__file__).resolve().parent.parent / ".venv-checkov" / "bin" / "checkov"


@dataclass(frozen=True)
class CheckedApp:
    stack: TrainingStack
    template_path: Path
    template: dict


@pytest.fixture(scope="module", params=sorted(PARAMETER_SETS))
def checked(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> CheckedApp:
    """Synthesize one parameter set with the AwsSolutions checks, as app.py does."""
    params = PARAMETER_SETS[request.param]
    out_dir = tmp_path_factory.mktemp(f"cdk-out-{request.param}")
    app = cdk.App(outdir=str(out_dir))
    stack = TrainingStack(app, f"Spotrun-{params.run_name}", params=params)
    apply_checks(app)
    assembly = app.synth()
    template_path = Path(assembly.get_stack_by_name(stack.stack_name).template_full_path)
    return CheckedApp(stack=stack, template_path=template_path,
                      template=json.loads(template_path.read_text()))


def nag_messages(stack: TrainingStack, level: str) -> list[str]:
    annotations = Annotations.from_stack(stack)
    find = annotations.find_error if level == "error" else annotations.find_warning
    return [f"{message.id}: {str(message.entry.data).splitlines()[0]}"
            for message in find("*", Match.string_like_regexp(r"^(AwsSolutions|CdkNag)"))]


def suppressions(template: dict) -> list[tuple[str, dict]]:
    """Return (logical id, suppression) for every cdk-nag suppression in the template."""
    found = []
    for logical_id, resource in template["Resources"].items():
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", []):
            found.append((logical_id, rule))
    return found


def test_cdk_nag_no_unsuppressed_error(checked: CheckedApp) -> None:
    errors = nag_messages(checked.stack, "error")

    assert errors == [], "\n".join(errors)


def test_cdk_nag_no_unsuppressed_warning(checked: CheckedApp) -> None:
    warnings = nag_messages(checked.stack, "warning")

    assert warnings == [], "\n".join(warnings)


def test_cdk_nag_suppressions_have_reasons(checked: CheckedApp) -> None:
    found = suppressions(checked.template)

    assert found, "expected the accepted findings to be recorded in the template"
    for logical_id, rule in found:
        reason = rule.get("reason", "")
        assert len(reason) >= MIN_REASON_CHARS, f"{logical_id} {rule['id']}: {reason!r}"
        assert rule["id"] not in reason, f"{logical_id}: the reason only names the rule"


def test_cdk_nag_wildcards_suppressed_one_by_one(checked: CheckedApp) -> None:
    # A wildcard finding is accepted for the named resource pattern only, never for
    # every wildcard a policy may gain later.
    for logical_id, rule in suppressions(checked.template):
        if rule["id"] == "AwsSolutions-IAM5":
            assert rule.get("applies_to"), f"{logical_id}: IAM5 suppressed without applies_to"


def test_cdk_nag_accepted_rules(checked: CheckedApp) -> None:
    rules = {rule["id"] for _, rule in suppressions(checked.template)}

    assert rules <= {"AwsSolutions-IAM5", "AwsSolutions-S1", "AwsSolutions-VPC7",
                     "CdkNagValidationFailure"}


def test_cfn_lint_reports_no_error(checked: CheckedApp) -> None:
    result = subprocess.run(
        [str(CFN_LINT), "--format", "parseable", "--", str(checked.template_path)],
        capture_output=True, text=True, timeout=CFN_LINT_TIMEOUT_S)
    findings = [line for line in result.stdout.splitlines() if line.strip()]

    errors = [line for line in findings if ":E" in line]
    assert errors == [], "\n".join(errors)
    # cfn-lint exits 2 on errors, 4 on warnings and 8 on informational findings.
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_has_no_failed_check(checked: CheckedApp) -> None:
    if not CHECKOV.exists():
        pytest.fail(f"checkov is not installed at {CHECKOV}; run `make setup`")
    # --skip-download and BC_SKIP_MAPPING keep checkov from calling its vendor's API.
    result = subprocess.run(
        [str(CHECKOV), "-f", str(checked.template_path), "--framework", "cloudformation",
         "--output", "json", "--quiet", "--skip-download"],
        capture_output=True, text=True, timeout=CFN_LINT_TIMEOUT_S,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    failed = [f"{check['check_id']} {check['resource']}"
              for check in report.get("results", {}).get("failed_checks", [])]
    assert failed == [], failed


def test_checkov_skips_have_reasons(checked: CheckedApp) -> None:
    skips = [(logical_id, skip)
             for logical_id, resource in checked.template["Resources"].items()
             for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", [])]
    assert skips, "the bucket, log group and topic carry recorded checkov skips"
    for logical_id, skip in skips:
        assert len(skip.get("comment", "")) >= MIN_REASON_CHARS, (logical_id, skip)
