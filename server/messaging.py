"""Small helpers around Flower's Grid: broadcast, collect replies, count bytes.

Every stage of a round (plain or secure) is "send one message per node, wait
at most T seconds, keep the good replies, note who failed": one function.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.common.secagg.errors import short_reason

log = logging.getLogger(__name__)


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: array data plus the JSON size of configs and metrics."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(record[k].data) for k in record)
        elif isinstance(record, ConfigRecord | MetricRecord):
            total += len(
                json.dumps({k: (v.hex() if isinstance(v, bytes) else v) for k, v in record.items()}, default=str)
            )
    return total


@dataclass
class StageResult:
    replies: dict[int, RecordDict] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)


def exchange(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    message_type: str,
    *,
    group: str,
    timeout: float,
) -> StageResult:
    """Send `contents[node]` to each node and gather replies until `timeout` seconds."""
    result = StageResult()
    messages = []
    for node, content in contents.items():
        result.bytes_down[node] = content_bytes(content)
        messages.append(Message(content, dst_node_id=node, message_type=message_type, group_id=group, ttl=timeout + 30))
    replies, sent = send_and_receive(grid, messages, timeout)
    for reply in replies:
        # by the message it answers: an error the SuperLink writes for a vanished node comes from the SuperLink
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            # Ray and Flower wrap a site's exception in their own traceback; the site's words come last.
            result.failed[node] = short_reason(reply.error.reason.rsplit("Message: ", 1)[-1])
            log.warning("%s from node %s failed: %s", message_type, node, result.failed[node])
            continue
        result.replies[node] = reply.content
        result.bytes_up[node] = content_bytes(reply.content)
    for node in contents:
        if node not in result.replies and node not in result.failed:
            result.failed[node] = f"no reply within {timeout:.0f}s"
    return result


POLL_S = 0.1  # how often a stage asks for replies


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> tuple[list[Message], dict[str, int]]:
    """`Grid.send_and_receive`, polling every POLL_S seconds instead of every 3 s; also returns each sent
    message's id -> destination node.

    Flower 1.42's deployment grid sleeps 3 s between pulls; a secure round has five stages, so that alone added
    about 7 s to a round whose sites answer in milliseconds (the simulation grid already polls every 0.1 s).
    """
    pending = set(grid.push_messages(messages))  # a message the grid could not store gets no id, and no reply
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # the grid stamped each id
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return replies, sent


def broadcast(nodes: Iterable[int], content: RecordDict) -> dict[int, RecordDict]:
    return dict.fromkeys(nodes, content)
