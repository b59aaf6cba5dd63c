"""Exceptions raised for bad user input."""


class InputError(ValueError):
    """Bad input: the message names the file, column or parameter that is wrong."""
