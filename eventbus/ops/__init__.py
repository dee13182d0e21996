"""Running the daemon: metrics, health of the loop, systemd, supervision, memory."""
