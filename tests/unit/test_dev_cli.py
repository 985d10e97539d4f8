"""`fmapi dev up --replicas`: what it accepts and how it refuses the rest."""

from __future__ import annotations

import argparse

import pytest

from fmapi_cli.dev import replicas
from fmapi_cli.system import SystemOptions


def test_replicas_per_service():
    assert replicas("gateway=2,auth=2,routing=2,quota=2,embedding=2") == {
        "gateway": 2, "auth": 2, "routing": 2, "quota": 2, "embedding": 2}
    assert replicas("usage=3,") == {"usage": 3}


@pytest.mark.parametrize("text, fragment", [
    ("envoy=2", "SERVICE one of"),
    ("gateway", "SERVICE=N"),
    ("gateway=0", "1 to 16"),
    ("gateway=17", "1 to 16"),
    ("gateway=two", "1 to 16"),
])
def test_bad_replica_counts_are_usage_errors(text, fragment):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        replicas(text)
    assert fragment in str(err.value)


def test_counts_default_to_one_and_keep_the_older_spellings(tmp_path):
    opts = SystemOptions(runtime_dir=tmp_path, gateways=3, replicas={"auth": 2})
    assert (opts.count("gateway"), opts.count("auth"), opts.count("routing")) == (3, 2, 1)
    assert SystemOptions(runtime_dir=tmp_path, gateways=3, replicas={"gateway": 2}).count("gateway") == 2
    with pytest.raises(ValueError):
        SystemOptions(runtime_dir=tmp_path, replicas={"quota": 0}).count("quota")


@pytest.mark.parametrize("text", ["routing=2", "gateway=2,quota=2", "", "auth=0"])
def test_dev_scale_takes_only_gateway_and_auth(text):
    from fmapi_cli.dev import scaled

    with pytest.raises(argparse.ArgumentTypeError):
        scaled(text)


def test_dev_scale_without_a_running_system_says_so(tmp_path, capsys):
    from fmapi_cli.dev import scale_command, scaled

    rc = scale_command(argparse.Namespace(replicas=scaled("gateway=3"), runtime_dir=str(tmp_path)))
    assert rc == 1
    assert "no running `fmapi dev up`" in capsys.readouterr().err
