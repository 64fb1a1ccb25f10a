"""pycompress.bench: see ARCHITECTURE.md."""
