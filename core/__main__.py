"""``python -m tuneforge`` (and ``torchrun -m tuneforge``) is the ``tuneforge`` command."""
from tuneforge.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
