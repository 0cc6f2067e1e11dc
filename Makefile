# Set-up on a fresh machine is part of every target: a virtual environment with the
# pinned Python packages and the pinned CDK CLI from package-lock.json.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# checkov pins boto3 and networkx versions that conflict with ours: it gets its own venv.
CHECKOV_STAMP := .venv-checkov/.installed
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION := 1
export CDK_DISABLE_VERSION_CHECK := 1

.PHONY: setup demo test bench bench-recovery synth clean

setup: $(PY_STAMP) $(NODE_STAMP) $(CHECKOV_STAMP)

$(CHECKOV_STAMP): requirements-checkov.txt
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install --quiet --disable-pip-version-check \
		-r requirements-checkov.txt
	touch $@

$(PY_STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The main job on the local cloud: deploy, train, one spot interruption, resume,
# finish, destroy. Prints progress and writes demo-report.json.
demo: setup
	$(PY) -m emulator run --scenario emulator/scenarios/demo.json --report demo-report.json \
		--work-dir .spotrun/demo

test: setup
	$(PY) -m pytest

# Checkpoint benchmark against a local moto server (about 5 minutes); figures, not tests.
bench: setup
	$(PY) -m bench checkpoint

# Multi-node recovery through the local cloud (about 5 minutes); figures, not tests.
bench-recovery: setup
	$(PY) -m bench recovery

synth: setup
	npx cdk synth --quiet

clean:
	rm -rf $(VENV) .venv-checkov node_modules cdk.out .pytest_cache demo-report.json \
		.spotrun
