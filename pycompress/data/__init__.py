"""pycompress.data: see ARCHITECTURE.md."""
