"""Commands an operator runs in a terminal against a running daemon, over its gRPC and HTTP
APIs: publish, pull, queues, purge and top; and the progress bars of long commands.

Module per role: remote (where the daemon is, TLS, token, exit codes), output (lines and
tables), messages (publish, pull, queues, purge), sampling and view (what top reads and shows),
top (its screen loop), keys (the keyboard), progress (bars on a terminal, quiet in scripts).
"""
