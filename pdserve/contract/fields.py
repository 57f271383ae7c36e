"""Names and rules shared by router and server (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Mapping

API_KEY_ENV = "PDSERVE_API_KEY"  # the key of `--api-key` when the flag is absent (server, router, launch)

DEFAULT_SERVER_PORT = 30000  # `pdserve serve` (SGLang's)
DEFAULT_ROUTER_PORT = 8000  # `pdserve router` / `pdserve launch`
DEFAULT_BOOTSTRAP_PORT = 8998  # a prefill server's bootstrap server (SGLang's)

# the PD fields a router adds to the body (SGLang's names); a scalar, or one per sequence
BOOTSTRAP_HOST = "bootstrap_host"
BOOTSTRAP_PORT = "bootstrap_port"
BOOTSTRAP_ROOM = "bootstrap_room"
BOOTSTRAP_KEYS = (BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM)

DP_RANK = "data_parallel_rank"  # SGLang's: the dp rank that serves the request (0 <= rank < dp size)

# pdserve's router's stream migration (router/migrate.py): a worker asked for STREAM_IDS puts an
# IDS_COMMENT line (`: pdserve-ids 5,6`, an SSE comment clients ignore) before each event it streams;
# a stream continued elsewhere carries RESUME_IDS (the ids already delivered, counted as output and
# not sent again) and the first server's chunk id and created time (RESPONSE_ID, CREATED)
STREAM_IDS = "pdserve_stream_ids"
RESUME_IDS = "pdserve_resume_ids"
RESPONSE_ID = "pdserve_response_id"
CREATED = "pdserve_created"
IDS_COMMENT = b": pdserve-ids "
# /v1/responses through a router: the router replaced `previous_response_id` by the conversation it
# names (the worker that stored it may not be the one serving now); the answer still names it
PREVIOUS_RESPONSE = "pdserve_previous_response_id"
# a non-streaming request that asks for STREAM_IDS gets its progress as such comments, then its whole
# answer as one `data:` event; an error after the first token is a STATUS_COMMENT (its HTTP status)
# before the error's event (server/handler.py's progress; the router's router/whole.py reads it)
STATUS_COMMENT = b": pdserve-status "

# fields a client sends that the router reads too: vLLM's and SGLang's `priority` (lower value first;
# the router's queue orders by it, both PD legs get it) and pdserve's TTFT deadline (milliseconds from
# when the request reached the first pdserve process: the router forwards what is left of it, a
# server drops a request whose prefill cannot begin in time)
PRIORITY = "priority"
TTFT_DEADLINE = "ttft_deadline_ms"

# Live role switches (issue 26): a server's epoch starts at 1 and grows with each switch of its role.
# A router that knows a worker's epoch (its discovery record, its /server_info) puts it in the leg it
# sends that worker (EPOCH) and the prefill's in both legs (BOOTSTRAP_EPOCH: the decode carries it in
# its route lookup to the prefill's bootstrap server). A server or bootstrap server at another epoch
# answers 409 with the error code STALE_EPOCH (the router then retries another pair); a server that
# drains answers new work 503 with DRAINING. PROMPT_TOKENS_HEADER / COMPLETION_TOKENS_HEADER: the
# token counts a generation answer reports to the router (completion tokens of whole answers only).
EPOCH = "pdserve_epoch"
BOOTSTRAP_EPOCH = "pdserve_bootstrap_epoch"
STALE_EPOCH = "stale_epoch"
DRAINING = "draining"
PROMPT_TOKENS_HEADER = "x-pdserve-prompt-tokens"
COMPLETION_TOKENS_HEADER = "x-pdserve-completion-tokens"

# `GET /server_info` (and SGLang's older `/get_server_info`): the struct is server_info.ServerInfo
SERVER_INFO_PATH = "/server_info"
SERVER_INFO_PATHS = (SERVER_INFO_PATH, "/get_server_info")


def prefill_dp_rank(room: int, dp_size: int) -> int:
    """The prefill dp rank that holds a room's KV (SGLang's convention): the prefill's DP front
    places the request there and the decode fetches the room's pages from it."""
    return room % dp_size


# (name, type, default) of every field a router may add to (or read from) a request body: the server's
# request models take exactly these (server/protocol.py builds its pydantic base from this table)
BODY_FIELDS: tuple[tuple[str, object, object], ...] = (
    (BOOTSTRAP_HOST, str | list[str] | None, None),
    (BOOTSTRAP_PORT, int | list[int] | None, None),
    (BOOTSTRAP_ROOM, int | list[int] | None, None),
    (DP_RANK, int | None, None),
    (STREAM_IDS, bool, False),
    (RESUME_IDS, list[int] | None, None),
    (RESPONSE_ID, str | None, None),
    (CREATED, int | None, None),
    (PREVIOUS_RESPONSE, str | None, None),
    (PRIORITY, int | None, None),
    (TTFT_DEADLINE, float | None, None),
    (EPOCH, int | None, None),
    (BOOTSTRAP_EPOCH, int | None, None),
)


def error_code_is(body: bytes, code: str) -> bool:
    """Does an OpenAI-style error body carry this error `code`? (a byte search: the router need not
    parse every error body it relays)."""
    return b'"code":"' + code.encode() + b'"' in body.replace(b'": "', b'":"')


def resolve_api_key(flag: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """`--api-key` when given, else $PDSERVE_API_KEY, else none (an empty variable is none)."""
    return flag if flag is not None else env.get(API_KEY_ENV) or None
