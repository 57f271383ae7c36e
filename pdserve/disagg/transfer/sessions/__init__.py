"""The two-sided control plane of pdserve's own backends: one session per (decode rank, prefill
endpoint), over framed TCP (wire.py), opened by a checked Hello (handshake.py, identity.py).

manager.py is the manager every pdserve backend extends; send.py (prefill: sessions, senders,
the sharded transfer queues of shards.py) and receive.py (decode: sessions, receivers) are its
two halves; data_path.py is what they ask of the backend.
"""
