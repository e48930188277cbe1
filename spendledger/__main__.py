import sys

from spendledger.cli import main

sys.exit(main())
