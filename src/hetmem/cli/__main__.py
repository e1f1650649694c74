import sys

from hetmem.cli.main import main

sys.exit(main())
