"""The internal app. Until it arrives, `python -m app` serves a small demo upstream."""
