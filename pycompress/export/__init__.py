"""pycompress.export: see ARCHITECTURE.md."""
