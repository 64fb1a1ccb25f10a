"""pycompress.decisions: see ARCHITECTURE.md."""
