"""``python -m llmkit`` runs the CLI (also the form ``accelerate launch -m llmkit`` uses)."""

from llmkit.cli import main

main()
