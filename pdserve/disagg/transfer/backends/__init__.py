"""The KV transfer backends (tcp, shm, nixl, mooncake, fake) and their data-path helpers.

Each backend is a TransferManager (../base.py) built on the shared control sessions
(../sessions/manager.py) plus its own data path: tcp pushes page bytes on the session, shm copies
into the decode's pool in /dev/shm (shm_pool.py), nixl and mooncake write one-sided into the pool
the decode's Hello describes (remote_pool.py); pages.py has the page arithmetic they share.
disagg/backends.py is the table of names the config checks and `create_manager` imports.
"""
