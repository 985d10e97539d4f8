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
