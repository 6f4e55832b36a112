"""Model updates: daily full and frequent incremental updates of a trained
two-tower model, each gated and published as the next served version.

Imports ``trainer`` and ``export``; neither imports this package, and
``serving`` imports none of them (it sees versions on disk).
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
