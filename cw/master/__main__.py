import sys

from cw.master.server import main

if __name__ == "__main__":
    sys.exit(main())
