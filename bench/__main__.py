"""`make bench`: run every benchmark, or the ones named on the command line."""

from __future__ import annotations

import importlib
import os
import sys

BENCHES = ["embeddings", "generation", "auth", "quota", "usage", "observability", "replicas"]
# Run only when named: py-spy profiles of the path (needs py-spy, not a dependency), and where
# the time to first token goes.
ON_REQUEST = ["profile", "ttft", "rpc_floor"]


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = argv or BENCHES
    unknown = [n for n in names if n not in BENCHES + ON_REQUEST]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHES + ON_REQUEST}",
              file=sys.stderr)
        return 2
    for name in names:
        importlib.import_module(f"bench.{name}").run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
