"""The edge sidecar: the public entry point that forwards to the internal app."""
