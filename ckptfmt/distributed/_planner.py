"""DCP planners whose plain values are msgpack, not pickle (spec/DISTRIBUTED.md §5).

Everything else is DCP's default planning: who writes what, deduplication, reshard overlaps.
"""

from __future__ import annotations

import io
from typing import Any

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType

from ._values import decode_value, encode_value


class SavePlanner(DefaultSavePlanner):
    """:class:`DefaultSavePlanner` that encodes bytes items (plain values) with msgpack instead of ``torch.save``."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002 (DCP's name)
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(encode_value(object))
        return object


class LoadPlanner(DefaultLoadPlanner):
    """:class:`DefaultLoadPlanner` that decodes bytes items with msgpack: no ``torch.load``, no pickle."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        set_value(self, read_item, decode_value(value.getvalue(), where=read_item.dest_index.fqn))


def set_value(planner: DefaultLoadPlanner, read_item: ReadItem, obj: Any) -> None:
    """Put a decoded plain value where :meth:`DefaultLoadPlanner.load_bytes` would."""
    from torch.distributed.checkpoint._nested_dict import FLATTEN_MAPPING  # noqa: F401 (documents the type)
    from torch.distributed.checkpoint._traverse import set_element

    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj
