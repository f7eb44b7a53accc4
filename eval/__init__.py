"""eval: see ARCHITECTURE.md."""
