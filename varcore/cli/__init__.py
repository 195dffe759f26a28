"""Sub-commands of the ``varcore`` command line (each module has ``add_parser(subparsers)`` and ``run(args)``)."""
