import sys

from pycompress.agent.command import main

sys.exit(main())
