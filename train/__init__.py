"""train: see ARCHITECTURE.md."""
