"""The bottom of every command line (stdlib only, no torch: `pdserve --help` stays fast).

- `table`: flag tables (`Flag` rows: spellings, the frozen-config field, type, help) and the
  helpers that add them to argparse and read the parsed values back into the config;
- `argtypes`: argparse `type=` checkers, so a bad value fails at parse time;
- `sockets`: a listening socket bound before a server starts (a taken port fails at once);
- `procs`: process-lifetime helpers of the processes the entry points start (die with the
  parent, kill a child's whole process group).

Engine, server, router, bench and launch build their flags from here; only `cli/` imports
`launch/`.
"""
