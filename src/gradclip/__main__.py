"""`python -m gradclip`: see `gradclip.commands.cli`."""

import sys

from gradclip.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m gradclip"))
