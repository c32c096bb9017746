"""One exception type for every mistake a user can make (bad config, bad file, bad checkpoint).

Entry points catch it and print its message as one line, exit status 2, no traceback.
"""

import argparse
import sys


class UserError(Exception):
    """A problem with the user's input, explained in one line."""

    def __init__(self, message):
        # Messages quote the user's own names (a TOML key, a file name), which may hold line breaks:
        # those are escaped as repr() shows them, so that the message stays one line.
        super().__init__("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(message)))


def exit_on_user_error(main):
    """Run main(); turn a UserError into `error: <message>` on stderr and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line and exit status 2, like every other."""

    def error(self, message):
        raise UserError(message)
