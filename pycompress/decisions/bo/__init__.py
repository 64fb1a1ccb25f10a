"""pycompress.decisions.bo: see ARCHITECTURE.md."""
