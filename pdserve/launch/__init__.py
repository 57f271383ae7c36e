"""`pdserve launch`: a whole cluster on this machine (`cluster`: its flags, start-up and
supervision; `procs`: the CPU plan and the child processes). Only `pdserve.cli` imports it; the
bottom helpers it shares with router, server and engine live in `pdserve.flags`."""
