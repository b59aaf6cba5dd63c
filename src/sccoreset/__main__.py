"""``python -m sccoreset``: the command line (see :mod:`sccoreset._cli`)."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
