"""The simple loop the gateway is compared with (run as its own process).

Read a record, wait for its app's limiter and the project's (aiolimiter, as a
first version would), send, write the result, repeat. A record of an app at
its limit blocks every record behind it in the partition.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiolimiter import AsyncLimiter


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--sim-port", type=int, required=True)
    p.add_argument("--app-rate", type=float, required=True)
    p.add_argument("--project-rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    ns = p.parse_args()
    base = f"http://127.0.0.1:{ns.sim_port}"
    consumer = AIOKafkaConsumer(
        ns.topic,
        bootstrap_servers=ns.bootstrap,
        group_id="baseline",
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
    )
    producer = AIOKafkaProducer(bootstrap_servers=ns.bootstrap, linger_ms=5)
    await consumer.start()
    await producer.start()
    project = AsyncLimiter(ns.project_rate, 1)
    apps: dict[str, AsyncLimiter] = {}
    deadline = time.monotonic() + ns.seconds
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=None,
            headers={"Authorization": "Basic ZGVtby1rZXk6ZGVtby1zZWNyZXQ="},
        ) as r:
            token = (await r.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            for records in batch.values():
                for rec in records:
                    if time.monotonic() >= deadline:
                        break
                    doc = orjson.loads(rec.value)
                    app_id = doc["payload"]["app_id"]
                    limiter = apps.setdefault(app_id, AsyncLimiter(ns.app_rate, 1))
                    await limiter.acquire()
                    await project.acquire()
                    payload = {**doc["payload"], "correlation_id": doc["request_id"]}
                    async with http.post(
                        f"{base}/us/v1/projects/demo-project/messages:send",
                        data=orjson.dumps(payload),
                        headers=headers,
                    ) as resp:
                        status = resp.status
                        await resp.read()
                    result = {
                        "request_id": doc["request_id"],
                        "status": "sent" if status == 200 else "failed",
                    }
                    await producer.send_and_wait(ns.results, orjson.dumps(result))
                    await consumer.commit()
    await producer.stop()
    await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
