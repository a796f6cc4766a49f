import sys

from dchag.cli import main

sys.exit(main())
