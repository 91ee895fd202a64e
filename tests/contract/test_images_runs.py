"""Backend contract: runs produce immutable, branchable images (CONTREE-API §8, §9)."""

from __future__ import annotations

import pytest

from contree import api
from contree.backend import Backend, ImageQuery, LineageReader
from contree.errors import NotFound

from .conftest import result_of, run, stderr_of, stdout_of

pytestmark = pytest.mark.engine


async def test_run_branch_and_rollback(backend: Backend, busybox: str) -> None:
    base = await run(backend, busybox, "mkdir -p /data && echo base > /data/f")
    assert base.status == "SUCCESS"
    parent = base.result_image_uuid
    assert parent and parent != busybox
    left = await run(backend, parent, "echo left >> /data/f && touch /data/left")
    right = await run(backend, parent, "echo right >> /data/f && rm /data/f && echo only-right > /data/r")
    assert left.result_image_uuid and right.result_image_uuid
    assert len({parent, left.result_image_uuid, right.result_image_uuid}) == 3
    seen_left = await run(backend, left.result_image_uuid, "cat /data/f; ls /data", disposable=True)
    assert stdout_of(seen_left) == "base\nleft\nf\nleft\n"
    seen_right = await run(backend, right.result_image_uuid, "ls /data; cat /data/r", disposable=True)
    assert stdout_of(seen_right) == "r\nonly-right\n"
    rollback = await run(backend, parent, "cat /data/f; ls /data", disposable=True)
    assert stdout_of(rollback) == "base\nf\n"


async def test_unchanged_run_returns_input_image(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "echo nothing written")
    assert resp.status == "SUCCESS"
    assert resp.result_image_uuid == busybox
    assert resp.result is not None and resp.result.image == busybox
    assert resp.image_size == 0


async def test_deletions_renames_and_modes_survive_commit(backend: Backend, busybox: str) -> None:
    first = await run(backend, busybox,
                      "mkdir -p /d/sub && echo a > /d/sub/a && echo b > /d/b && chmod 600 /d/b")
    assert first.result_image_uuid
    second = await run(
        backend, first.result_image_uuid,
        "rm /bin/vi && mv /d/sub /d/moved && chmod 751 /d/moved && rm /d/b && chmod 4755 /d/moved/a",
    )
    assert second.status == "SUCCESS" and result_of(second).state.exit_code == 0  # type: ignore[union-attr]
    assert second.result_image_uuid
    check = await run(
        backend, second.result_image_uuid,
        "test -e /bin/vi && echo vi; test -e /d/sub && echo sub; ls /d; cat /d/moved/a; "
        "stat -c %a /d/moved /d/moved/a; test -e /d/b || echo b-gone",
        disposable=True,
    )
    assert stdout_of(check) == "moved\na\n751\n4755\nb-gone\n"


async def test_disposable_has_no_result_image(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "echo x > /tmp/x", disposable=True)
    assert resp.status == "SUCCESS"
    assert resp.result_image_uuid is None
    assert resp.image_size is None


async def test_nonzero_exit_is_success(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "echo oops >&2; exit 3")
    assert resp.status == "SUCCESS"
    state = result_of(resp).state
    assert state is not None and state.exit_code == 3 and state.signal == -1 and not state.timed_out
    assert stderr_of(resp) == "oops\n"


async def test_result_image_records_parent_and_operation(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "touch /marker")
    assert resp.result_image_uuid
    image = await backend.get_image(resp.result_image_uuid)
    assert image.operation_uuid == resp.uuid
    listed = await backend.list_images(ImageQuery(uuid=resp.result_image_uuid))
    assert [i.uuid for i in listed] == [resp.result_image_uuid]
    if isinstance(backend, LineageReader):  # the engine and its service; not the REST API
        info = await backend.image_lineage(resp.result_image_uuid)
        assert info.parent is not None and info.parent.uuid == busybox
        assert info.root.uuid == busybox
        assert info.depth == 1


async def test_tags_move_and_resolve(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "touch /tagged")
    assert resp.result_image_uuid
    await backend.set_tag(resp.result_image_uuid, "proj/env:1")
    assert await backend.resolve_tag("proj/env:1") == resp.result_image_uuid
    via_tag = await run(backend, "tag:proj/env:1", "ls /tagged", disposable=True)
    assert via_tag.image_uuid == resp.result_image_uuid
    assert stdout_of(via_tag) == "/tagged\n"
    await backend.delete_tag(resp.result_image_uuid)
    with pytest.raises(NotFound):
        await backend.resolve_tag("proj/env:1")


async def test_operation_listing_filters(backend: Backend, busybox: str) -> None:
    ok = await run(backend, busybox, "true", disposable=True)
    from contree.backend import OperationQuery

    ops = await backend.list_operations(OperationQuery(status="SUCCESS", kind="instance"))
    assert ok.uuid in [o.uuid for o in ops]
    assert all(isinstance(o, api.OperationSummary) for o in ops)
    none = await backend.list_operations(OperationQuery(status="FAILED"))
    assert ok.uuid not in [o.uuid for o in none]
    recent = await backend.list_operations(OperationQuery(since="10m"))
    assert ok.uuid in [o.uuid for o in recent]


async def test_replaced_directory_hides_lower_content(backend: Backend, busybox: str) -> None:
    replaced = await run(backend, busybox, "rm -rf /usr/bin && mkdir /usr/bin && echo new > /usr/bin/only")
    assert replaced.status == "SUCCESS" and replaced.result_image_uuid
    assert result_of(replaced).state.exit_code == 0  # type: ignore[union-attr]
    check = await run(backend, replaced.result_image_uuid, "ls -A /usr/bin; cat /usr/bin/only",
                      disposable=True)
    assert stdout_of(check) == "only\nnew\n"
