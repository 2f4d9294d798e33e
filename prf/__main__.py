"""``python -m prf ...``: the ``prf`` command without the installed entry point (a cluster job's
environment, or Lightning's DDP launcher, which re-runs the command that started it)."""

from prf.cli import main

if __name__ == "__main__":
    main()
