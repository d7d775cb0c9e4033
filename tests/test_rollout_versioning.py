"""The readers-writer lock and version rules of the rollout service (no model, no server)."""

from __future__ import annotations

import asyncio

import pytest

from services.student_rollout.versioning import PolicyVersions, ReadWriteLock, VersionConflict


def run(coro):
    return asyncio.run(coro)


def test_readers_share_writer_excludes():
    async def main():
        lock = ReadWriteLock()
        events: list[str] = []

        async def reader(name: str, hold: float):
            async with lock.read():
                events.append(f"{name}+")
                await asyncio.sleep(hold)
                events.append(f"{name}-")

        async def writer():
            async with lock.write():
                events.append("W+")
                await asyncio.sleep(0.01)
                events.append("W-")

        r1 = asyncio.create_task(reader("r1", 0.05))
        r2 = asyncio.create_task(reader("r2", 0.05))
        await asyncio.sleep(0.01)
        w = asyncio.create_task(writer())
        await asyncio.sleep(0.01)
        # Arrives while the writer waits: writer preference puts it behind the writer.
        r3 = asyncio.create_task(reader("r3", 0.0))
        await asyncio.gather(r1, r2, w, r3)
        return events

    events = run(main())
    assert events[:2] == ["r1+", "r2+"]
    assert events.index("W+") > events.index("r1-") and events.index("W+") > events.index("r2-")
    assert events.index("W-") == events.index("W+") + 1
    assert events.index("r3+") > events.index("W-")


def test_cancelled_writer_unblocks_readers():
    async def main():
        lock = ReadWriteLock()
        await lock.acquire_read()
        w = asyncio.create_task(lock.acquire_write())
        await asyncio.sleep(0.01)
        assert lock.writer_waiting
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        # A new reader must not wait for the writer that gave up.
        await asyncio.wait_for(lock.acquire_read(), 1.0)
        assert lock.readers == 2

    run(main())


def test_cancelled_reader_returns_lease():
    async def main():
        lock = ReadWriteLock()

        async def reader():
            async with lock.read():
                await asyncio.sleep(10)

        t = asyncio.create_task(reader())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await asyncio.wait_for(lock.acquire_write(), 1.0)

    run(main())


def test_versions_grow_and_failed_update_keeps_old():
    async def main():
        versions = PolicyVersions(initial_version=3)
        async with versions.serving() as v:
            assert v == 3
        for bad in (2, 3):
            with pytest.raises(VersionConflict, match="not newer"):
                async with versions.updating(bad, "x"):
                    pass
        with pytest.raises(RuntimeError):
            async with versions.updating(5, "bad"):
                raise RuntimeError("engine refused")
        assert versions.version == 3 and versions.current.source == "initial"
        async with versions.updating(5, "good"):
            pass
        assert versions.version == 5 and versions.current.source == "good"
        assert versions.current.update_seconds is not None

    run(main())


def test_request_admitted_before_update_reports_old_version():
    async def main():
        versions = PolicyVersions()
        seen: list[int] = []

        async def request(delay: float):
            async with versions.serving() as v:
                await asyncio.sleep(delay)
                # Whatever happens meanwhile, the version cannot change under a lease.
                assert versions.version == v
                seen.append(v)

        async def update():
            async with versions.updating(1, "new"):
                await asyncio.sleep(0.01)

        first = asyncio.create_task(request(0.05))
        await asyncio.sleep(0.01)
        u = asyncio.create_task(update())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(request(0.0))
        await asyncio.gather(first, u, late)
        return seen

    assert run(main()) == [0, 1]


def test_load_path_rules(tmp_path):
    """Path checks of load-by-path, without a server."""
    from services.common.errors import APIError
    from services.student_rollout.settings import RolloutSettings
    from services.student_rollout.weights import WeightsManager

    closed = WeightsManager(RolloutSettings(model="m"), PolicyVersions())
    with pytest.raises(APIError) as err:
        closed.resolve_load_path("step-1")
    assert err.value.status == 403 and "--weights-dir" in err.value.message

    root = tmp_path / "weights"
    (root / "step-1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    manager = WeightsManager(RolloutSettings(model="m", weights_dir=root), PolicyVersions())
    assert manager.resolve_load_path("step-1") == (root / "step-1").resolve()
    assert manager.resolve_load_path(str(root / "step-1")) == (root / "step-1").resolve()
    for raw, status in [("../elsewhere", 400), ("step-1/../../elsewhere", 400),
                        ("link", 403), (str(tmp_path / "elsewhere"), 403), ("/", 403),
                        ("a\0b", 400)]:
        with pytest.raises(APIError) as err:
            manager.resolve_load_path(raw)
        assert err.value.status == status, raw
        assert err.value.param == "path"
