import sys

from vnicd.daemon import main

sys.exit(main())
