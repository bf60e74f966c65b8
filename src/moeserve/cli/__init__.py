"""The `moeserve` command line: one module per command (see app.py).

Without a terminal (output piped or redirected), rich lays tables and help out 80 columns wide and cuts
what does not fit; moeserve asks for WIDE columns instead (the user's TERMINAL_WIDTH still wins).
"""

import os
import sys

WIDE = 200

if not (sys.stdout.isatty() and sys.stderr.isatty()):
    os.environ.setdefault("TERMINAL_WIDTH", str(WIDE))  # read by typer's help formatter when it is imported
