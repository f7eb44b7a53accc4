"""data_scripts: see ARCHITECTURE.md."""
