"""``python -m coord`` runs the CLI."""

from coord.cli.main import main  # type: ignore[import-not-found]

main()
