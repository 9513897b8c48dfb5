"""``python -m upcycle`` (also what ``accelerate launch -m upcycle`` runs)."""

from upcycle.cli import main

main()
