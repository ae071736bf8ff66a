"""The `harp` command line."""
