"""Interruption drills: an AWS FIS experiment on AWS, a scenario on the local cloud."""

from __future__ import annotations

import uuid

from spotrun_cli.aws import CliError

RUN_TAG = "spotrun:run"

LOCAL_CLOUD_HELP = """\
The local cloud has no AWS FIS, so a drill there is a whole emulator run that follows
a scenario file: it deploys the stack, sends the spot notices the file lists, and
destroys the stack. Write, for example, drill.json:

  {{"description": "drill: one spot interruption",
   "params": {{"run_name": "{run}"}},
   "interruptions": [{{"after_step": 200, "notice_seconds": 10, "action": "terminate"}}]}}

and run: python -m emulator run --scenario drill.json --report drill-report.json
(emulator/scenarios/ has more examples.)"""


def local_cloud_help(run: str) -> str:
    return LOCAL_CLOUD_HELP.format(run=run)


def find_experiment_template(fis, run: str) -> dict:
    """Return the one FIS experiment template tagged spotrun:run=<run>; raise CliError otherwise."""
    matches = []
    token = None
    while True:
        response = fis.list_experiment_templates(**({"nextToken": token} if token else {}))
        matches.extend(template for template in response.get("experimentTemplates", [])
                       if template.get("tags", {}).get(RUN_TAG) == run)
        token = response.get("nextToken")
        if not token:
            break
    if not matches:
        raise CliError(f"no AWS FIS experiment template tagged {RUN_TAG}={run} in this region; "
                       f"the stack does not create one yet, so create a template that sends "
                       f"aws:ec2:send-spot-instance-interruptions to the run's instances and "
                       f"tag it {RUN_TAG}={run}")
    if len(matches) > 1:
        ids = ", ".join(sorted(template["id"] for template in matches))
        raise CliError(f"{len(matches)} AWS FIS experiment templates are tagged "
                       f"{RUN_TAG}={run} ({ids}); keep one tag so the drill is unambiguous")
    return matches[0]


def start_drill(fis, run: str) -> dict:
    """Start the run's FIS experiment and return it (id, state, experimentTemplateId)."""
    template = find_experiment_template(fis, run)
    response = fis.start_experiment(experimentTemplateId=template["id"],
                                    clientToken=str(uuid.uuid4()),
                                    tags={RUN_TAG: run})
    return response["experiment"]
