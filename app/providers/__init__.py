"""Clients for the outside services the app depends on, each on the shared outbound transport."""
