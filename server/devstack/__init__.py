"""Embedded Redis and PostgreSQL for ``tokenchat dev`` and the tests."""
