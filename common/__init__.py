"""Small pieces every process of the project shares: log lines, the error envelope, settings conventions."""
