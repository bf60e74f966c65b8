"""Errors that mean "the user gave us bad input": the CLI prints them as one line and exits 2."""


class MoeServeError(Exception):
    """Bad input or an unusable artefact (missing model, dense model, corrupt trace, ...).

    The message is one line, written for the person at the terminal.
    """
