"""pycompress.report: see ARCHITECTURE.md."""
