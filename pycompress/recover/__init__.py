"""pycompress.recover: see ARCHITECTURE.md."""
