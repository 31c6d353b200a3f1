import sys

from residtap.cli import main

sys.exit(main())
