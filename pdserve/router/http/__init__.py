"""Lean HTTP/1.1 on asyncio Protocols: the router's data plane. A layer under `app.py`, not an entry point.

- `parser.py`: incremental, strict HTTP/1.1 parsing (no I/O), shared by both sides;
- `protocol.py`: the client-facing side: `HttpListener` accepts connections on a bound socket,
  one `HttpProtocol` per connection parses requests, hands each to the app's handler and writes
  its `Response` (or a chunked stream through `StreamWriter`);
- `client.py`: the worker-facing side: `UpstreamPool` of keep-alive connections per worker.

A measured exception to "use well-kept libraries": proxying with aiohttp cost about 3x the CPU
per request of SGLang's Rust router (`benchmarks/router_overhead.py` measures router CPU per
request), so the request path speaks HTTP/1.1 itself. The control plane (health checks,
`/get_load`, `/server_info`) is not on that path and uses aiohttp.
"""
