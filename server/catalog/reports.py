"""Reports of a user, or of one of their messages, to the admins' queue.

A report is a row (``reports``); admins page the open ones and resolve
them. Resolution is not an audit record by itself: the moderation audit log
(issue #12, its own table) should record who resolved what.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tokenchat.protocol.limits import USER_ID_RE

from ..errors import BadRequest, NotFound, Unavailable
from .moderation import append_audit

# What a reason and a resolution may hold (characters): a paragraph.
REPORT_REASON_LEN_MAX = 1000
# A reported message's reference: a DM's tx or a room event's offset.
REPORT_MESSAGE_LEN_MAX = 128
STATES = ("open", "resolved", "all")

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)


def _wire(row: asyncpg.Record) -> dict[str, Any]:
    resolved_at = row["resolved_at"]
    return {
        "id": row["id"],
        "reporter": row["reporter"],
        "user": row["reported"],
        "message": row["message"],
        "reason": row["reason"],
        "state": row["state"],
        "resolution": row["resolution"],
        "resolved_by": row["resolved_by"],
        "ts": int(row["created_at"].timestamp() * 1000),
        "resolved_ts": None if resolved_at is None else int(resolved_at.timestamp() * 1000),
    }


def check_text(value: Any, name: str, *, required: bool, len_max: int) -> str | None:
    """A reason, a resolution or a message reference: text without NUL."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not (1 <= len(value) <= len_max) or "\x00" in value:
        raise BadRequest(f"field '{name}' must be a string of 1 to {len_max} characters")
    return value


class Reports:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def file(self, reporter: str, user: Any, message: Any, reason: Any) -> dict[str, Any]:
        if not isinstance(user, str) or not USER_ID_RE.fullmatch(user):
            raise BadRequest("field 'user' is required and must be a user id")
        if user == reporter:
            raise BadRequest("you cannot report yourself")
        checked_message = check_text(
            message, "message", required=False, len_max=REPORT_MESSAGE_LEN_MAX
        )
        checked_reason = check_text(reason, "reason", required=True, len_max=REPORT_REASON_LEN_MAX)
        try:
            row = await self._pool.fetchrow(
                """INSERT INTO reports (reporter, reported, message, reason)
                   SELECT $1, id, $3, $4 FROM users WHERE id = $2
                   RETURNING *""",
                reporter,
                user,
                checked_message,
                checked_reason,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("reports are unavailable; nothing was filed") from exc
        if row is None:
            raise NotFound(f"no user '{user}'")
        return _wire(row)

    async def queue(self, state: str, before: int | None, limit: int) -> dict[str, Any]:
        """Reports in ``state`` (or all), newest first, paged by id."""
        try:
            rows = await self._pool.fetch(
                """SELECT * FROM reports
                    WHERE ($1 = 'all' OR state = $1) AND ($2::bigint IS NULL OR id < $2)
                    ORDER BY id DESC LIMIT $3""",
                state,
                before,
                limit + 1,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("reports are unavailable") from exc
        page = rows[:limit]
        more = len(rows) > limit
        return {
            "reports": [_wire(row) for row in page],
            "next": str(page[-1]["id"]) if more and page else None,
        }

    async def resolve(self, report_id: int, admin: str, resolution: Any) -> dict[str, Any]:
        """Close a report; resolving a resolved one again changes nothing and
        answers it as it stands, with ``already``."""
        checked = check_text(
            resolution, "resolution", required=False, len_max=REPORT_REASON_LEN_MAX
        )
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT * FROM reports WHERE id = $1 FOR UPDATE", report_id
                )
                if row is None:
                    raise NotFound(f"no report {report_id}")
                if row["state"] == "resolved":
                    return {**_wire(row), "already": True}
                row = await conn.fetchrow(
                    """UPDATE reports SET state = 'resolved', resolution = $2,
                              resolved_by = $3, resolved_at = now()
                        WHERE id = $1 RETURNING *""",
                    report_id,
                    checked,
                    admin,
                )
                # An admin's action: in the audit log, with the report's close.
                assert row is not None
                await append_audit(
                    conn,
                    admin,
                    "report_resolve",
                    None,
                    row["reported"],
                    {"report": report_id, "resolution": checked},
                )
        except _DB_ERRORS as exc:
            raise Unavailable("reports are unavailable; nothing changed") from exc
        assert row is not None
        return _wire(row)
