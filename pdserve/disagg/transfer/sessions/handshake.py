"""The prefill's check of a decode's Hello (the first message of a transfer session).

A session is refused (HelloAck with `error`, then closed) when the cluster secret is set and
the Hello does not carry it (the server's `--api-key` stands in for it when
PDSERVE_CLUSTER_TOKEN is unset), when the backends differ, or when the KV layouts cannot
exchange pages. Compared in constant time.
"""

from __future__ import annotations

import hmac

from pdserve.disagg.messages import Hello, KVLayout


def secret_matches(got: str | None, want: str) -> bool:
    return hmac.compare_digest((got or "").encode(), want.encode())


def refusal(hello: Hello, token: str | None, backend: str, layout: KVLayout) -> str | None:
    """Why this prefill refuses the session, or None."""
    if token is not None and not secret_matches(hello.token, token):
        return "cluster token rejected"
    if hello.backend != backend:
        return f"backend mismatch: decode uses {hello.backend!r}, prefill uses {backend!r}"
    try:
        layout.check_compatible(hello.layout, mine="prefill", theirs="decode")
    except ValueError as exc:
        return str(exc)
    return None
