import sys

from pycompress.cli.main import main

sys.exit(main())
