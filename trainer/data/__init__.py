"""Data layer: canonical tables and the loaders that produce them."""
from trainer.data.tables import DataError, Tables
from trainer.data.loading import load_tables

__all__ = ["DataError", "Tables", "load_tables"]
