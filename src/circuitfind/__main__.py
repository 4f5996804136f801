import sys

from circuitfind.cli import main

sys.exit(main())
