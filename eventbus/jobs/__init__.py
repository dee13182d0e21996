"""Background work: the crons, bookkeeping workers and the ledger they write."""
