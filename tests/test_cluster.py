"""The torchrun command line and the rendezvous round record of bootstrap/cluster.py."""

from __future__ import annotations

import pytest

from bootstrap.cluster import Round, torchrun_command, training_arguments, uses_torchrun
from bootstrap.config import ConfigError, RunConfig


def make_config(**overrides) -> RunConfig:
    values = {"run_id": "unit", "region": "us-east-1", "bucket": "bucket",
              "group_name": "group", "data_zip_uri": "s3://bucket/data.zip",
              "train_command": ["{python}", "-m", "ml.digits", "--epochs", "3"]}
    values.update(overrides)
    return RunConfig(**values)


ROUND = Round(number=3, endpoint="10.0.1.5:29500", leader="i-leader",
              members=("i-member",), resume_step=120)


def test_single_process_runs_without_torchrun():
    assert not uses_torchrun(make_config())
    assert uses_torchrun(make_config(gpus_per_node=4))
    assert uses_torchrun(make_config(gpus_per_node=0))
    assert uses_torchrun(make_config(nodes=2, min_nodes=2))


def test_standalone_command_for_one_instance():
    command = torchrun_command(make_config(gpus_per_node=0), round_=None, is_host=True,
                               local_addr="10.0.1.5")

    assert command[:3] == ["{python}", "-m", "ml.launch"]
    assert "--nproc-per-node=0" in command
    assert "--standalone" in command
    assert "--max-restarts=0" in command
    assert command[-4:] == ["-m", "ml.digits", "--epochs", "3"]


def test_round_command_points_at_leader_store():
    config = make_config(nodes=2, min_nodes=2, rendezvous_timeout_seconds=90)

    leader = torchrun_command(config, round_=ROUND, is_host=True, local_addr="10.0.1.5")
    member = torchrun_command(config, round_=ROUND, is_host=False, local_addr="10.0.1.6")

    assert "--nnodes=2" in leader
    assert "--rdzv-backend=c10d" in leader
    assert "--rdzv-endpoint=10.0.1.5:29500" in leader
    assert "--rdzv-id=unit-round-3" in leader
    assert "--rdzv-conf=is_host=true,join_timeout=90" in leader
    assert "--rdzv-conf=is_host=false,join_timeout=90" in member
    assert "--local-addr=10.0.1.6" in member
    assert "--standalone" not in member


@pytest.mark.parametrize(("command", "expected"), [
    (["{python}", "-m", "pkg.train", "--lr", "1"], ["-m", "pkg.train", "--lr", "1"]),
    (["{python}", "train.py", "--lr", "1"], ["train.py", "--lr", "1"]),
    (["/usr/bin/my-trainer", "--lr", "1"], ["--no-python", "/usr/bin/my-trainer", "--lr", "1"]),
])
def test_training_arguments_follow_torchrun_options(command, expected):
    assert training_arguments(command) == expected


def test_interpreter_option_rejected_under_torchrun():
    with pytest.raises(ConfigError) as raised:
        training_arguments(["{python}", "-u", "train.py"])

    assert "-u" in str(raised.value)
    assert "-m MODULE or a script path" in str(raised.value)


def test_round_record_round_trips():
    restored = Round.from_dict({**ROUND.to_dict(), "published_at": 1.0})

    assert restored == ROUND
    assert restored.node_count == 2


def test_first_round_has_no_resume_step():
    record = Round(number=1, endpoint="h:1", leader="i-a", members=(), resume_step=None)

    assert Round.from_dict(record.to_dict()).resume_step is None
