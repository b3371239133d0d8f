"""Distributed ``prepare`` (issue 13): placeholder, the design note follows."""
