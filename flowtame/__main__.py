"""``python -m flowtame``: the command line (also what ``torchrun -m flowtame`` starts on each rank)."""

from flowtame.cli import main

if __name__ == "__main__":
    main()
