"""Transfers of tensor-parallel servers: which ranks exchange which KV heads (links.py), and how
rank 0 drives every rank's manager: the frames (messages.py), rank 0's hub (hub.py) and manager
over all ranks (ranked.py), each other rank's agent (agent.py).
"""
