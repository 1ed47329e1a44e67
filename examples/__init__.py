"""Runnable examples: the demo (the main job) and the cross-framework harness it shares with
the parity tests. Not installed: run them from the checkout (`python -m examples.demo`)."""
