"""pycompress.fidelity: see ARCHITECTURE.md."""
