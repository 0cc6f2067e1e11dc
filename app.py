#!/usr/bin/env python3
"""CDK app: read the stack parameters once from context and build the run's stack."""

import sys

import aws_cdk as cdk

from stacks.config import ParameterError, from_context
from stacks.nag import apply_checks
from stacks.training_stack import TrainingStack


def main() -> None:
    app = cdk.App()
    try:
        params = from_context(app.node.get_all_context())
    except ParameterError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    TrainingStack(app, f"Spotrun-{params.run_name}", params=params,
                  description=f"spotrun training run {params.run_name} on EC2 Spot")
    # An unsuppressed AwsSolutions error makes `cdk synth` and `cdk deploy` fail.
    apply_checks(app)
    app.synth()


if __name__ == "__main__":
    main()
