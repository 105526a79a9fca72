"""``python -m bnfold ...`` runs the command line."""

from bnfold.cli import entry

if __name__ == "__main__":
    entry()
