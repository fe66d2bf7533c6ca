"""Run configurations (ml_collections). `default.py` holds every field; the others override."""
