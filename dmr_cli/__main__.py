"""`python -m dmr_cli`: what the auto-start spawns."""

from dmr_cli.cli import main

if __name__ == "__main__":
    main()
