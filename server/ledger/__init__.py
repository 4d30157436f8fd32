"""The durable ledger: the outbox writer into Postgres, reconcile, confirmations."""
