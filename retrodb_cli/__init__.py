"""The `retrodb` command line (installed as the package ``retrodb_cli``)."""
