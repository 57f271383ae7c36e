"""Lean HTTP/1.1 on asyncio Protocols: the router's data plane (front server + pooled worker client)."""
