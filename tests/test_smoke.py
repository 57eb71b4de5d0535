import asyncio
import uuid

from orch8 import Client
from orch8.config import Settings
from orch8.engine.worker import Worker
from orch8.store.claims import Owner


def test_noop_instance_completes(dsn):
    with Client(dsn) as client:
        client.create_sequence("hello", [{"id": "a", "handler": "noop", "params": {"x": 1}},
                                         {"id": "b", "handler": "log", "params": {"message": "x={{ steps.a.x }}"}}])
        created = client.start("hello", {"n": 1})

        async def main():
            stop = asyncio.Event()
            worker = Worker(Settings(tick_interval_ms=20), dsn, Owner("n1", uuid.uuid4(), 0))
            task = asyncio.create_task(worker.run(stop))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if client.get(created.id).state == "completed":
                    break
            stop.set()
            await task

        asyncio.run(main())
        done = client.get(created.id)
        assert done.state == "completed", done.last_error
        assert done.outputs == {"a": {"x": 1}, "b": {"message": "x=1"}}
