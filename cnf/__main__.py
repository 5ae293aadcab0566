"""``python -m cnf``: the ``cnf`` command (what ``torchrun -m cnf train ...`` runs on each rank)."""

from cnf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
