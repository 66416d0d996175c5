"""Sub-commands of the `rlr-fast` command line; each has configure(parser) and run(args)."""
