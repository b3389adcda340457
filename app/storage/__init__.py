"""Where the app keeps things: conversation checkpoints and reply audio."""
