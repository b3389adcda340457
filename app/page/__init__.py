"""The voice page: what a person opens at `/` to talk to the companion (docs/page.md).

`assets` fingerprints the files of `static/` once at start-up; `routes` serves them.
"""
