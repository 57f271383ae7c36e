"""Transfers of tensor-parallel servers: which ranks exchange which KV heads (links.py)."""
