"""`python -m transferkit ...` (also what `torchrun -m transferkit train ...` runs)."""

from transferkit.cli import main

if __name__ == "__main__":
    main()
