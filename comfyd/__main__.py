import sys

from comfyd.cli import main

sys.exit(main())
