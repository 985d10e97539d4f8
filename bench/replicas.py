"""Does a second gateway replica raise throughput? Embeddings through Envoy with 1 vs 2 gateway
replicas, the two systems running side by side, CLIENTS concurrent clients, rounds alternating
after a warm-up of both. Prints requests/s of each and the ratio 2 / 1.

On a 2-core machine the figure says where the bottleneck is (the gateway's one Python process,
or the embedding model and Envoy sharing the same two cores), not how fmapi scales on a real
cluster. Run: ``make bench replicas`` (or ``python -m bench replicas``).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from .common import embeddings_rate, table

CLIENTS = 64
ROUNDS = 4  # per side, alternating
REQUESTS = 600  # per round
ENDPOINTS = """
endpoints:
  - name: all-minilm-l6-v2
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
"""


async def _round(base_url: str, headers: dict, n: int) -> float:
    return await embeddings_rate(base_url, headers, n, CLIENTS)


def run() -> dict:
    from fmapi_cli.system import System, SystemOptions

    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "endpoints.yaml").write_text(ENDPOINTS)
        systems = {n: System(SystemOptions(runtime_dir=tmp / f"g{n}", http_port=0,
                                           endpoints_file=tmp / "endpoints.yaml",
                                           replicas={"gateway": n}))
                   for n in rates}
        try:
            for s in systems.values():
                s.start()
            heads = {n: {"authorization": f"Bearer {s.admin_token}"} for n, s in systems.items()}
            for n, s in systems.items():
                asyncio.run(_round(s.base_url, heads[n], 100))  # warm-up
            for i in range(ROUNDS):
                for n in ((1, 2) if i % 2 == 0 else (2, 1)):
                    rates[n].append(asyncio.run(_round(systems[n].base_url, heads[n], REQUESTS)))
        finally:
            for s in systems.values():
                s.stop()
    mean = {n: sum(v) / len(v) for n, v in rates.items()}
    table(f"replicas: embeddings through Envoy, {CLIENTS} concurrent clients, 1 vs 2 gateway "
          f"replicas, {ROUNDS} alternating rounds of {REQUESTS} requests", [
        ("requests/s  1 gateway / 2 gateways",
         f"{mean[1]:8.1f} / {mean[2]:8.1f}   ratio {mean[2] / mean[1]:.2f}"),
        ("  per round, 1 gateway", " ".join(f"{x:7.1f}" for x in rates[1])),
        ("  per round, 2 gateways", " ".join(f"{x:7.1f}" for x in rates[2])),
    ])
    return {"ratio_2_over_1": mean[2] / mean[1]}


if __name__ == "__main__":
    run()
