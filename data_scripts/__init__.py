"""Data scripts: make_base_model.py (a base pipeline folder) and build_duplicated_dataset.py (a study dataset)."""
