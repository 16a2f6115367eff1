"""`python -m cropi ...` (what `torchrun ... -m cropi score ...` runs on every rank)."""

from cropi.cli import main

main(prog_name="cropi")
