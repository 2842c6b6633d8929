"""The SQLite engine's schema: numbered migrations and views under ``PRAGMA user_version``
(``coord.backend.sqlite``'s ladder), package data of coord."""
