"""Integers as ClickHouse columns hold them: a value outside is refused where a message is decoded (the
sink makes it a reject), never wrapped around by the insert (JSON lines: 300 in a UInt8 lands as 44)."""

from typing import Annotated

from pydantic import Field

UInt8 = Annotated[int, Field(ge=0, le=2**8 - 1)]
UInt16 = Annotated[int, Field(ge=0, le=2**16 - 1)]
UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
UInt64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
