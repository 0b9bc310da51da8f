"""``python -m chatgate_server.simulator``: see ``cli``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m chatgate_server.simulator"))
