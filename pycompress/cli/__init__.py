from pycompress.cli.main import main

__all__ = ["main"]
