"""What the router and the server both speak (stdlib + msgspec only, like `kv_events`).

The router never imports the server (nor torch); the two agree on the names below instead of
spelling them twice: the extra body fields a router adds to a request (`BODY_FIELDS`), the
rule that puts a PD room on a prefill dp rank, how many sequences (rooms) a request carries
and which entry each takes (sequences.py), `/server_info`'s struct (server_info.py), the
record a server registers for discovery (worker.py), the epoch fields and error codes of live role
switches, the token-count headers, the API-key variable and the default ports.
"""

from pdserve.contract.fields import (
    API_KEY_ENV,
    BODY_FIELDS,
    BOOTSTRAP_HOST,
    BOOTSTRAP_KEYS,
    BOOTSTRAP_EPOCH,
    BOOTSTRAP_PORT,
    BOOTSTRAP_ROOM,
    COMPLETION_TOKENS_HEADER,
    CREATED,
    DEFAULT_BOOTSTRAP_PORT,
    DEFAULT_ROUTER_PORT,
    DEFAULT_SERVER_PORT,
    DP_RANK,
    DRAINING,
    EPOCH,
    IDS_COMMENT,
    PREVIOUS_RESPONSE,
    PRIORITY,
    PROMPT_TOKENS_HEADER,
    RESPONSE_ID,
    RESUME_IDS,
    SERVER_INFO_PATH,
    SERVER_INFO_PATHS,
    STATUS_COMMENT,
    STALE_EPOCH,
    STREAM_IDS,
    TTFT_DEADLINE,
    error_code_is,
    prefill_dp_rank,
    resolve_api_key,
)
from pdserve.contract.sequences import per_sequence, sequence_count
from pdserve.contract.server_info import (FAILURE_POLICY, MODE_OF_ROLE, RECOMPUTE, ServerInfo, decode_server_info,
                                          encode_server_info)
from pdserve.contract.worker import WORKER_ROLES, WorkerRecord, decode_record, encode_record

__all__ = ["API_KEY_ENV", "BODY_FIELDS", "BOOTSTRAP_HOST", "BOOTSTRAP_KEYS", "BOOTSTRAP_PORT", "BOOTSTRAP_ROOM",
           "CREATED", "DEFAULT_BOOTSTRAP_PORT", "DEFAULT_ROUTER_PORT", "DEFAULT_SERVER_PORT", "DP_RANK",
           "FAILURE_POLICY", "IDS_COMMENT", "MODE_OF_ROLE", "PREVIOUS_RESPONSE", "PRIORITY", "RECOMPUTE",
           "RESPONSE_ID", "RESUME_IDS",
           "SERVER_INFO_PATH", "SERVER_INFO_PATHS", "STATUS_COMMENT", "STREAM_IDS", "TTFT_DEADLINE", "ServerInfo",
           "decode_server_info", "encode_server_info", "per_sequence", "prefill_dp_rank", "resolve_api_key",
           "sequence_count", "WORKER_ROLES", "WorkerRecord", "decode_record", "encode_record", "BOOTSTRAP_EPOCH",
           "COMPLETION_TOKENS_HEADER", "DRAINING", "EPOCH", "PROMPT_TOKENS_HEADER", "STALE_EPOCH", "error_code_is"]
