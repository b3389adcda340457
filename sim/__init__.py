"""The offline provider simulator: the parts of the Groq and ElevenLabs HTTP APIs the app
uses, validated like the real ones, with deterministic replies and injectable faults.

It lets the app, its tests and a developer's laptop run without network access, keys or
quota, and lets resilience tests make a provider fail, slow down or refuse on demand.
See docs/simulator.md.
"""
