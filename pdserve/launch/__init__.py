"""Starting processes: `pdserve launch` (a whole cluster on this machine: `cluster`), child
process groups, CPU plans and parent-death handling (`procs`), and listening sockets bound
before a server starts (`sockets`). Light imports only: the router uses it too."""
