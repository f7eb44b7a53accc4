"""bench: see ARCHITECTURE.md."""
