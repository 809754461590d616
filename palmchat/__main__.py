"""``python -m palmchat``: the same as the ``palmchat`` command (torchrun runs the trainer so)."""

from palmchat.app import main

main()
