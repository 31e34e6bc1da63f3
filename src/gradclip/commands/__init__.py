"""The command line: `gradclip demo`, `bench`, `check` (`cli` wires them to argparse)."""
