"""Serving one database to many processes and machines: `retrodb serve` (:mod:`.app`,
:mod:`.service`), its client (:mod:`.client`) and the sharded Ray Serve deployment.

Importing :mod:`retrodb` does not import this package's HTTP stack; ``retrodb.connect``
and ``retrodb.open(url)`` import the client when they are called."""
