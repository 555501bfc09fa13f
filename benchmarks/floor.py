"""The CPU floor: a bare aiohttp client sending what the gateway sends, as its own process.

    python -m benchmarks.floor --port 8089 --lanes 40 --rate 800 --seconds 10 [--loop uvloop]

``lanes`` loops share ``rate``: each posts a SendMessageRequest to the simulator at its own
even pace (lane i starts i/rate seconds after lane 0), reads the answer and parses its JSON,
like a hand-written client with one loop per app would. No Kafka, no retries, no metrics:
what is left is the cost of aiohttp and the event loop at that rate. Prints one JSON line:
``{"sent", "seconds", "cpu_us_per_request", "loop"}``; CPU is the process's, from the first
send to the last answer.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson

from gateway.cli import loop_factory, sample_request

BASIC = "Basic ZGVtby1rZXk6ZGVtby1zZWNyZXQ="  # demo-key:demo-secret, the simulator's default


async def floor(port: int, lanes: int, rate: float, seconds: float) -> dict[str, object]:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        form = {"grant_type": "client_credentials"}
        async with http.post(
            f"{base}/oauth2/token", data=form, headers={"Authorization": BASIC}
        ) as resp:
            token = (await resp.json())["access_token"]
        url = f"{base}/us/v1/projects/demo-project/messages:send"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        per_lane = max(1, int(rate * seconds / lanes))
        interval = lanes / rate
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05

        async def lane(i: int) -> int:
            body = orjson.dumps(sample_request(f"floor-{i}", 0)["payload"])
            sent = 0
            for k in range(per_lane):
                delay = t0 + i / rate + k * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with http.post(url, data=body, headers=headers) as resp:
                    orjson.loads(await resp.read())
                sent += 1
            return sent

        await asyncio.sleep(t0 - loop.time())
        cpu0, wall0 = time.process_time(), time.monotonic()
        sent = sum(await asyncio.gather(*(lane(i) for i in range(lanes))))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    name = type(loop).__module__.split(".")[0]
    return {"sent": sent, "seconds": wall, "cpu_us_per_request": cpu / sent * 1e6, "loop": name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="the simulator's port")
    p.add_argument("--lanes", type=int, default=40)
    p.add_argument("--rate", type=float, default=800.0, help="requests per second, all lanes")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    ns = p.parse_args()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = loop_factory(ns.loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        out = runner.run(floor(ns.port, ns.lanes, ns.rate, ns.seconds))
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
