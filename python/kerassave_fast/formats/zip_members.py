"""Names of zip members as `zipfile` gives them (imports nothing heavy: the command line uses it)."""

from __future__ import annotations

from .._core import ZipMember

_UTF8_NAME = 0x800  # general purpose flag bit 11: the name is UTF-8, else CP437


def member_name(member: ZipMember) -> str:
    """The name `zipfile` would give the member."""
    raw: bytes = member.raw_name
    name = raw.decode("utf-8") if member.flags & _UTF8_NAME else raw.decode("cp437")
    return name.split("\x00", 1)[0]
