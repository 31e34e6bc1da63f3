"""``python -m gradclip``: see `gradclip.cli`."""

import sys

from gradclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
