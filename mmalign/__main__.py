"""`python -m mmalign` (what torchrun and srun launch): the `mmalign` command."""

from mmalign.cli import main

if __name__ == "__main__":
    main()
